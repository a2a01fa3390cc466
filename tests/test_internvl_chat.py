"""The InternVL chat model (minivl/models/internvl_chat.py, torch_impl/models/internvl_chat.py).

Tiny random checkpoints in the InternVL2-1B / -2B / -4B layouts (300M-style ViT + Qwen2 /
InternLM2 / Phi-3) and a 6B-style ViT, written by minivl.tiny.internvl. Checked here:
* NumPy vs torch per stage (ViT, pixel shuffle, mlp1, LLM logits) and end to end, float32/float64;
* the splice of image features into the prompt against an explicit (tile, token) loop;
* the chat prompt, token for token, against the spec's strings typed in here;
* chat / batch_chat: identical greedy token ids in NumPy and torch, first-turn-only `<image>`,
  left-padded batch rows equal to single-prompt answers, history semantics;
* named errors: count mismatch, unset <IMG_CONTEXT> id, tokenizer without the token, bad checkpoint.
"""
import numpy as np
import pytest
import torch
from PIL import Image

import minivl
import torch_impl
from minivl.checkpoint import load_state_dict
from minivl.errors import CheckpointError, ConfigError, GenerationError, ShapeError
from minivl.models.internvl_chat import InternVLChatModel
from minivl.preprocess import dynamic_preprocess, to_pixel_values
from minivl.testing import assert_close, tolerance
from minivl.tiny.internvl import write_tiny_internvl
from minivl.tokenizer import Tokenizer
from torch_impl.models.internvl_chat import InternVLChatModel as TorchInternVLChatModel
from torch_impl.pixel_shuffle import pixel_shuffle as torch_pixel_shuffle

COMBOS = [("qwen2", "300m"), ("internlm2", "300m"), ("phi3", "300m"), ("internlm2", "6b")]
DTYPES = [("float32", torch.float32), ("float64", torch.float64)]
SYS2 = "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, 是一个有用无害的人工智能助手。"

# Tolerances. Every stage is a short chain of matmuls (depth <= 288), norms, erf/exp and softmaxes
# over O(1) values; NumPy (pairwise/BLAS) and torch (its own kernels) sum in different orders, so
# each element carries a few hundred roundings at most. 512 ulps relative, and 512 ulps of the
# stage's typical magnitude (~4) absolute near zero, bounds that in float32 and float64 alike; the
# measured worst cases are 10-50x below (see the printed comparisons with pytest -s).
ULPS = 512


def tol(dtype, scale=4.0):
    return tolerance(dtype, ULPS, ULPS, scale=scale)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """One float64 checkpoint per combo (loaded as float32 or float64), written once for the module."""
    root = tmp_path_factory.mktemp("internvl")
    return {combo: write_tiny_internvl(root / f"{combo[0]}_{combo[1]}", llm=combo[0], vision=combo[1],
                                       dtype="float64", seed=3)
            for combo in COMBOS}


@pytest.fixture(scope="module")
def models(checkpoints):
    """(numpy model, torch model, tokenizer) per (combo, dtype), loaded lazily and cached."""
    cache = {}

    def get(combo, dtype):
        if (combo, dtype) not in cache:
            path = checkpoints[combo]
            cache[combo, dtype] = (minivl.load_model(path, dtype), torch_impl.load_model(path, dtype),
                                   Tokenizer.from_file(path))
        return cache[combo, dtype]

    return get


def image_tiles(width=100, height=60, seed=0, image_size=56, max_num=4) -> np.ndarray:
    """Pixel values of a smooth random picture: [n_tiles, 3, s, s] float32 (2×1 grid + thumbnail here)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (4, 6, 3), dtype=np.uint8)
    picture = Image.fromarray(small).resize((width, height), Image.BICUBIC)
    return to_pixel_values(dynamic_preprocess(picture, max_num=max_num, image_size=image_size,
                                              use_thumbnail=True), image_size)


def prompt_ids(tokenizer, model, n_tiles, text="Describe it."):
    """A chat prompt with one image of n_tiles tiles, tokenized; sets img_context_token_id."""
    from minivl.conversation import build_query, encode

    model.img_context_token_id = tokenizer.token_to_id("<IMG_CONTEXT>")
    # a short system prompt keeps the byte-level prompt short (the real one: test_chat_prompt_is_the_spec_string)
    query = build_query(model.template, "You are InternVL.", "<image>\n" + text, [], [n_tiles],
                        model.num_image_token)
    return np.asarray([encode(tokenizer, query)], dtype=np.int64)


# ----------------------------------------------------------------------------- NumPy vs torch, per stage

@pytest.mark.parametrize("dtype, torch_dtype", DTYPES)
@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_numpy_and_torch_agree_stage_by_stage(models, combo, dtype, torch_dtype):
    model, twin, tokenizer = models(combo, dtype)
    pixel_values = image_tiles().astype(dtype)
    pixels_t = torch.from_numpy(pixel_values)
    rtol, atol = tol(dtype)

    # 1. ViT last hidden state
    vit = model.vision_model.forward(pixel_values).last_hidden_state
    with torch.no_grad():
        vit_t = twin.vision_model(pixels_t).last_hidden_state
    c = assert_close(vit, vit_t, rtol=rtol, atol=atol, what="ViT last_hidden_state")
    print(f"\n{combo} {dtype} ViT: {c}")

    # 2. pixel shuffle of the SAME features: pure data movement, bit-identical
    n, _, width = vit.shape
    grid = vit[:, 1:].reshape(n, 4, 4, width)           # 56-px tiles: a 4×4 patch grid
    shuffled = model.pixel_shuffle(grid, model.downsample_ratio)
    np.testing.assert_array_equal(shuffled, torch_pixel_shuffle(torch.from_numpy(grid), 0.5, "v2").numpy())

    # 3. mlp1 on the SAME shuffled features
    tokens = shuffled.reshape(n, -1, shuffled.shape[-1])
    with torch.no_grad():
        projected_t = twin.mlp1(torch.from_numpy(tokens))
    c = assert_close(model.mlp1(tokens), projected_t, rtol=rtol, atol=atol, what="mlp1")
    print(f"{combo} {dtype} mlp1: {c}")

    # 4. extract_feature end to end
    features = model.extract_feature(pixel_values)
    assert features.shape == (len(pixel_values), model.num_image_token, model.config.llm_config.hidden_size)
    c = assert_close(features, twin.extract_feature(pixels_t), rtol=rtol, atol=atol, what="extract_feature")
    print(f"{combo} {dtype} extract_feature: {c}")

    # 5. LLM logits of the whole multimodal prompt
    input_ids = prompt_ids(tokenizer, model, len(pixel_values))
    twin.img_context_token_id = model.img_context_token_id
    logits = model.forward(pixel_values, input_ids).logits
    logits_t = twin.forward(pixels_t, torch.from_numpy(input_ids)).logits
    assert logits.dtype == np.dtype(dtype) and logits.shape == (1, input_ids.shape[1], len(tokenizer))
    c = assert_close(logits, logits_t, rtol=rtol, atol=atol, what="logits")
    print(f"{combo} {dtype} logits: {c}")


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_forward_returns_the_language_models_attention_probabilities(models, combo):
    """output_attentions (the reference forward's argument): one [b, heads, t, t] per layer, the very
    probabilities the language model computes on the spliced embeddings; NumPy and torch agree."""
    model, twin, tokenizer = models(combo, "float32")
    pixel_values = image_tiles()
    input_ids = prompt_ids(tokenizer, model, len(pixel_values))
    twin.img_context_token_id = model.img_context_token_id
    out = model.forward(pixel_values, input_ids, output_attentions=True)
    llm = model.config.llm_config
    assert len(out.attentions) == llm.num_hidden_layers
    t = input_ids.shape[1]
    assert all(a.shape == (1, llm.num_attention_heads, t, t) for a in out.attentions)
    embeds = model.embed_with_images(input_ids, model.extract_feature(pixel_values), keep_graph_form=True)
    direct = model.language_model(inputs_embeds=embeds, output_attentions=True).attentions
    for got, want in zip(out.attentions, direct):
        np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(np.sum(out.attentions[0], axis=-1), 1.0, rtol=0, atol=1e-5)  # rows are softmaxes
    with torch.no_grad():
        twin_out = twin.forward(torch.from_numpy(pixel_values), torch.from_numpy(input_ids), output_attentions=True)
    rtol, atol = tol("float32")
    for layer, (got, want) in enumerate(zip(out.attentions, twin_out.attentions)):
        assert_close(got, want, rtol=rtol, atol=atol, what=f"{combo} attention probabilities, layer {layer}")
    assert model.forward(pixel_values, input_ids).attentions is None


@pytest.mark.parametrize("combo", COMBOS, ids=lambda c: f"{c[0]}-{c[1]}")
def test_float32_run_tracks_the_float64_gold(models, combo):
    """The float32 model against the float64 one: the whole pipeline's float32 rounding, bounded."""
    pixel_values = image_tiles()
    model32, _, tokenizer = models(combo, "float32")
    model64, _, _ = models(combo, "float64")
    input_ids = prompt_ids(tokenizer, model32, len(pixel_values))
    model64.img_context_token_id = model32.img_context_token_id
    logits32 = model32.forward(pixel_values, input_ids).logits
    logits64 = model64.forward(pixel_values.astype(np.float64), input_ids).logits
    # float32 error grows with depth (3 ViT + 2 LLM layers, ~100-token attention): 256 ulps of
    # float32 (3e-5 relative) of a magnitude-4 logit; measured worst 6.4e-6 absolute, ~20x below
    rtol, atol = tolerance("float32", 256, 256, scale=4.0)
    c = assert_close(logits32, logits64, rtol=rtol, atol=atol, what="float32 vs float64 logits")
    print(f"\n{combo} float32 vs float64 logits: {c}")


# ----------------------------------------------------------------------------- image-token splice

def test_features_fill_context_tokens_in_tile_token_order(models):
    model, twin, tokenizer = models(("qwen2", "300m"), "float64")
    ctx = tokenizer.token_to_id("<IMG_CONTEXT>")
    model.img_context_token_id = twin.img_context_token_id = ctx
    n_tok = model.num_image_token
    # batch of 2 rows; row 0 has images A (2 tiles) and B (1 tile), row 1 has image C (1 tile)
    text = [tokenizer.token_to_id("<s>"), 40, 41]
    row0 = text + [ctx] * (2 * n_tok) + [42] + [ctx] * n_tok + [43]
    row1 = [44] * (len(row0) - n_tok - 1) + [ctx] * n_tok + [45]
    input_ids = np.array([row0, row1], dtype=np.int64)
    features = np.random.default_rng(1).standard_normal((4, n_tok, model.config.llm_config.hidden_size))

    spliced = model.embed_with_images(input_ids, features, keep_graph_form=True)
    # the expectation by an explicit loop: the k-th context token (row-major) gets feature row k,
    # rows numbered tile-major: k = tile·num_image_token + token
    expected = model.language_model.embed_tokens(input_ids).copy()
    flat_features = [features[tile, token] for tile in range(4) for token in range(n_tok)]
    k = 0
    for b in range(2):
        for t in range(input_ids.shape[1]):
            if input_ids[b, t] == ctx:
                expected[b, t] = flat_features[k]
                k += 1
    assert k == 4 * n_tok
    np.testing.assert_array_equal(spliced, expected)
    np.testing.assert_array_equal(twin.embed_with_images(torch.from_numpy(input_ids), torch.from_numpy(features),
                                                         keep_graph_form=False).numpy(), expected)


@pytest.mark.parametrize("package", ["numpy", "torch"])
def test_count_mismatch_is_a_named_error(models, package):
    model, twin, tokenizer = models(("qwen2", "300m"), "float32")
    m = model if package == "numpy" else twin
    pixel_values = image_tiles()                         # 3 tiles
    input_ids = prompt_ids(tokenizer, model, 2)          # room for 2 tiles only
    m.img_context_token_id = model.img_context_token_id
    if package == "torch":
        pixel_values, input_ids = torch.from_numpy(pixel_values), torch.from_numpy(input_ids)
    with pytest.raises(ShapeError, match=r"8 <IMG_CONTEXT> tokens but the images give 12 feature rows"):
        m.forward(pixel_values, input_ids)
    with pytest.raises(ShapeError, match="IMG_CONTEXT"):
        m.generate(pixel_values=pixel_values, input_ids=input_ids, max_new_tokens=1)


def test_image_flags_drop_dummy_tiles(models):
    model, twin, tokenizer = models(("qwen2", "300m"), "float64")
    pixel_values = image_tiles()
    input_ids = prompt_ids(tokenizer, model, 2)
    flags = np.array([1, 0, 1])
    twin.img_context_token_id = model.img_context_token_id
    logits = model.forward(pixel_values, input_ids, image_flags=flags).logits
    # same as feeding only the kept tiles
    kept = model.forward(pixel_values[[0, 2]], input_ids).logits
    rtol, atol = tol("float64")
    assert_close(logits, kept, rtol=rtol, atol=atol, what="image_flags")
    assert_close(twin.forward(torch.from_numpy(pixel_values), torch.from_numpy(input_ids),
                              image_flags=torch.from_numpy(flags)).logits, kept, rtol=rtol, atol=atol,
                 what="torch image_flags")


def test_select_layer_and_ps_version_v1(tmp_path):
    path = write_tiny_internvl(tmp_path / "vl", llm="qwen2", dtype="float64", select_layer=-2, ps_version="v1")
    model, twin = minivl.load_model(path, "float64"), torch_impl.load_model(path, "float64")
    pixel_values = image_tiles()
    with pytest.warns(UserWarning, match="transposed"):
        features = model.extract_feature(pixel_values)
    # by hand: hidden_states[-2] = output of the second-to-last layer, cls dropped, v1 (transposed) grid
    hidden = model.vision_model.forward(pixel_values, output_hidden_states=True).hidden_states
    assert len(hidden) == model.config.vision_config.num_hidden_layers + 1
    grid = hidden[-2][:, 1:].reshape(3, 4, 4, -1)
    blocks = np.concatenate([grid[:, 0::2, 0::2], grid[:, 0::2, 1::2], grid[:, 1::2, 0::2], grid[:, 1::2, 1::2]], -1)
    by_hand = model.mlp1(blocks.transpose(0, 2, 1, 3).reshape(3, 4, -1))
    np.testing.assert_allclose(features, by_hand, rtol=0, atol=0)
    with pytest.warns(UserWarning, match="transposed"):
        features_t = twin.extract_feature(torch.from_numpy(pixel_values))
    rtol, atol = tol("float64")
    assert_close(features, features_t, rtol=rtol, atol=atol, what="select_layer -2, v1")


# ----------------------------------------------------------------------------- chat

class Recorder:
    """Wraps a model's generate to record what chat passes to it (calls) and what it returned (outputs)."""

    def __init__(self, model):
        self.model, self.original, self.calls, self.outputs = model, model.generate, [], []

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        self.outputs.append(self.original(**kwargs))
        return self.outputs[-1]


@pytest.mark.parametrize("combo, template, stop", [
    (("qwen2", "300m"), "Hermes-2", "<|im_end|>"),
    (("internlm2", "300m"), "internlm2-chat", "<|im_end|>"),
    (("phi3", "300m"), "phi3-chat", "<|end|>"),
])
def test_chat_prompt_is_the_spec_string(models, combo, template, stop, monkeypatch):
    model, _, tokenizer = models(combo, "float32")
    assert model.template == template
    recorder = Recorder(model)
    monkeypatch.setattr(model, "generate", recorder)
    pixel_values = image_tiles()
    model.chat(tokenizer, pixel_values, "What is this?", dict(max_new_tokens=2))
    image = "<img>" + "<IMG_CONTEXT>" * (4 * 3) + "</img>"
    q = f"{image}\nWhat is this?"
    expected = {
        "Hermes-2": f"<|im_start|>system\n{SYS2}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n",
        "internlm2-chat": f"<|im_start|>system\n{SYS2}<|im_end|><|im_start|>user\n{q}<|im_end|><|im_start|>assistant\n",
        "phi3-chat": f"<|system|>\n{SYS2}<|end|><|user|>\n{q}<|end|><|assistant|>\n",
    }[template]
    ids = recorder.calls[0]["input_ids"][0].tolist()
    # InternLM2 and Phi-3 tokenizers prepend <s>; Qwen2's adds nothing
    bos = [tokenizer.token_to_id("<s>")] if combo[0] in ("internlm2", "phi3") else []
    assert ids == bos + tokenizer.encode(expected)
    assert tokenizer.decode(ids, skip_special_tokens=False) == ("<s>" if bos else "") + expected
    assert recorder.calls[0]["eos_token_id"] == tokenizer.token_to_id(stop)


def test_internvl2_5_template_stops_at_stripped_separator(tmp_path, monkeypatch):
    path = write_tiny_internvl(tmp_path / "vl", llm="qwen2", template="internvl2_5", system_message="S")
    model, tokenizer = minivl.load_model(path), Tokenizer.from_file(path)
    recorder = Recorder(model)
    monkeypatch.setattr(model, "generate", recorder)
    model.chat(tokenizer, None, "hi", dict(max_new_tokens=1))
    ids = recorder.calls[0]["input_ids"][0].tolist()
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    # sep is '<|im_end|>\n': the stop token is its stripped form (a token that exists)
    assert recorder.calls[0]["eos_token_id"] == tokenizer.token_to_id("<|im_end|>")


def test_response_is_cut_at_the_separator_and_stripped(models, monkeypatch):
    model, _, tokenizer = models(("phi3", "300m"), "float32")
    answer = tokenizer.encode("  a cat <|end|> trailing")
    monkeypatch.setattr(model, "generate", lambda **kwargs: np.array([answer]))
    # <|end|> is special, so decoding already drops it; the reference's split then finds nothing
    assert model.chat(tokenizer, None, "q", {}) == "a cat  trailing"
    plain = tokenizer.encode("  a dog")
    monkeypatch.setattr(model, "generate", lambda **kwargs: np.array([plain]))
    assert model.chat(tokenizer, None, "q", {}) == "a dog"


def test_first_turn_only_image_insertion_and_history(models, monkeypatch):
    model, _, tokenizer = models(("qwen2", "300m"), "float64")
    recorder = Recorder(model)
    monkeypatch.setattr(model, "generate", recorder)
    pixel_values = image_tiles()
    answer, history = model.chat(tokenizer, pixel_values, "first?", dict(max_new_tokens=3), return_history=True)
    assert history == [("<image>\nfirst?", answer)]
    answer2, history2 = model.chat(tokenizer, pixel_values, "second?", dict(max_new_tokens=3), history=history,
                                   return_history=True)
    assert history2[1][0] == "second?"         # no <image> prepended on a follow-up turn
    assert history == [("<image>\nfirst?", answer)]
    prompt = tokenizer.decode(recorder.calls[1]["input_ids"][0].tolist(), skip_special_tokens=False)
    # the history's <image> is the one expanded; the new question has none
    assert prompt.count("<img>") == 1 and prompt.index("<img>") < prompt.index("first?")
    assert "<|im_start|>user\nsecond?<|im_end|><|im_start|>assistant\n" in prompt
    assert f"first?<|im_end|><|im_start|>assistant\n{answer}<|im_end|>" in prompt


@pytest.mark.parametrize("combo, dtype", [(combo, "float64") for combo in COMBOS] + [(("internlm2", "6b"), "float32")],
                         ids=lambda v: f"{v[0]}-{v[1]}" if isinstance(v, tuple) else v)
def test_chat_and_batch_chat_same_tokens_in_numpy_and_torch(models, combo, dtype, monkeypatch):
    model, twin, tokenizer = models(combo, dtype)
    rec, rec_t = Recorder(model), Recorder(twin)
    monkeypatch.setattr(model, "generate", rec)
    monkeypatch.setattr(twin, "generate", rec_t)
    # a short system prompt keeps the byte-level prompt (and the test) short; the real one is
    # checked token for token in test_chat_prompt_is_the_spec_string
    monkeypatch.setattr(model, "system_message", "You are InternVL.")
    monkeypatch.setattr(twin, "system_message", "You are InternVL.")
    a = image_tiles(seed=1)                             # 3 tiles
    b = image_tiles(40, 40, seed=2)                     # 1 tile
    config = dict(max_new_tokens=6, do_sample=False)

    answer = model.chat(tokenizer, a, "What is in the picture?", dict(config))
    answer_t = twin.chat(tokenizer, torch.from_numpy(a), "What is in the picture?", dict(config))
    ids, ids_t = rec.outputs[0], rec_t.outputs[0]
    np.testing.assert_array_equal(np.asarray(ids), ids_t.numpy())
    assert answer == answer_t

    questions = ["What is in the picture?", "Colour?"]
    pixels = np.concatenate([a, b])
    answers = model.batch_chat(tokenizer, pixels, questions, dict(config), num_patches_list=[3, 1])
    answers_t = twin.batch_chat(tokenizer, torch.from_numpy(pixels), questions, dict(config), num_patches_list=[3, 1])
    batch_ids, batch_ids_t = rec.outputs[1], rec_t.outputs[1]
    np.testing.assert_array_equal(np.asarray(batch_ids), batch_ids_t.numpy())
    assert answers == answers_t
    # left padding changes nothing: row 0 of the batch answers exactly as the single chat did
    assert answers[0] == answer
    np.testing.assert_array_equal(np.asarray(batch_ids)[0, :np.asarray(ids).shape[1]], np.asarray(ids)[0])
    padded = rec.calls[1]["attention_mask"]
    assert padded[1, 0] == 0 and padded[0].all()        # the shorter prompt is padded on the LEFT


def test_chat_without_image_is_plain_text(models):
    model, twin, tokenizer = models(("internlm2", "300m"), "float64")
    config = dict(max_new_tokens=4)
    answer, history = model.chat(tokenizer, None, "Hello", dict(config), return_history=True)
    assert history == [("Hello", answer)]
    assert twin.chat(tokenizer, None, "Hello", dict(config)) == answer


def test_system_message_from_config_overrides_the_template(tmp_path):
    path = write_tiny_internvl(tmp_path / "vl", llm="phi3", system_message="Be brief.")
    assert minivl.load_model(path).system_message == "Be brief."
    assert torch_impl.load_model(path).system_message == "Be brief."


# ----------------------------------------------------------------------------- errors and loading

def test_chat_errors(models):
    model, _, tokenizer = models(("qwen2", "300m"), "float32")
    pixel_values = image_tiles()
    with pytest.raises(ShapeError, match="adds up to 2"):
        model.chat(tokenizer, pixel_values, "q", {}, num_patches_list=[2])
    with pytest.raises(GenerationError, match="num_beams"):
        model.chat(tokenizer, pixel_values, "q", dict(num_beams=2))
    with pytest.raises(GenerationError, match="single turns"):
        model.batch_chat(tokenizer, pixel_values, ["q"], {}, history=[])
    with pytest.raises(GenerationError, match="placeholders"):
        model.chat(tokenizer, pixel_values, "two images, one <image>", {}, num_patches_list=[1, 2])


def test_unset_context_id_and_tokenizer_without_it(tmp_path):
    fresh = minivl.load_model(write_tiny_internvl(tmp_path / "vl"))
    with pytest.raises(GenerationError, match="img_context_token_id"):
        fresh.forward(image_tiles(), np.zeros((1, 4), dtype=np.int64))

    class PlainTokenizer:
        def token_to_id(self, token):
            return None if token == "<IMG_CONTEXT>" else 0

    with pytest.raises(ConfigError, match="<IMG_CONTEXT>"):
        fresh.chat(PlainTokenizer(), image_tiles(), "q", {})


def test_checkpoint_errors_list_every_prefixed_tensor(checkpoints):
    path = checkpoints[("qwen2", "300m")]
    config = minivl.config.load_config(path)
    state = load_state_dict(path)
    shapes = InternVLChatModel.expected_shapes(config)
    assert set(shapes) == set(state)
    assert any(k.startswith("vision_model.") for k in shapes) and "mlp1.3.bias" in shapes
    broken = dict(state)
    del broken["mlp1.1.weight"]
    del broken["language_model.model.norm.weight"]
    broken["vision_model.extra"] = np.zeros(1)
    with pytest.raises(CheckpointError) as err:
        InternVLChatModel.from_state_dict(config, broken)
    message = str(err.value)
    assert "mlp1.1.weight" in message and "language_model.model.norm.weight" in message
    assert "vision_model.extra" in message
    with pytest.raises(CheckpointError, match="mlp1.1.weight"):
        TorchInternVLChatModel.from_state_dict(config, broken)


def test_torch_state_dict_keys_are_the_checkpoints(models, checkpoints):
    _, twin, _ = models(("phi3", "300m"), "float32")
    assert set(twin.state_dict()) == set(load_state_dict(checkpoints[("phi3", "300m")]))


@pytest.mark.parametrize("key", [("qwen2", "300m"), ("internlm2", "6b")], ids=["qwen2-300m", "internlm2-6b"])
def test_numpy_state_dict_is_the_checkpoint(models, checkpoints, key):
    """The NumPy module tree holds every checkpoint tensor under its own key, with its values (tolerance 0)."""
    model, twin, _ = models(key, "float32")
    state = load_state_dict(checkpoints[key])
    ours = model.state_dict()
    assert set(ours) == set(state) == set(twin.state_dict())
    for name, tensor in state.items():
        np.testing.assert_array_equal(ours[name], np.asarray(tensor, dtype=np.float32), err_msg=name)


# ----------------------------------------------------------------------------- independent reference

def _to_transformers(config, state: dict) -> dict:
    """InternVL checkpoint keys -> transformers' InternVLForConditionalGeneration keys (tests/test_trace.py too).

    vision_model.* -> model.vision_tower.* by test_intern_vit's InternViT map (qkv split into q/k/v_proj),
    mlp1.{0,1,3} -> model.multi_modal_projector.{layer_norm, linear_1, linear_2},
    language_model.model.* -> model.language_model.*, language_model.lm_head -> lm_head.
    """
    from test_intern_vit import _to_hf

    vit = {key[len("vision_model."):]: value for key, value in state.items() if key.startswith("vision_model.")}
    hf = {"model.vision_tower." + key: value for key, value in _to_hf(config.vision_config, vit).items()}
    for index, name in (("0", "layer_norm"), ("1", "linear_1"), ("3", "linear_2")):
        for leaf in ("weight", "bias"):
            hf[f"model.multi_modal_projector.{name}.{leaf}"] = torch.from_numpy(np.array(state[f"mlp1.{index}.{leaf}"]))
    for key, value in state.items():
        if key.startswith("language_model.model."):
            hf["model.language_model." + key[len("language_model.model."):]] = torch.from_numpy(np.array(value))
    hf["lm_head.weight"] = torch.from_numpy(np.array(state["language_model.lm_head.weight"]))
    return hf


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_matches_transformers_internvl_end_to_end(models, checkpoints, dtype):
    """transformers' own InternVL port (InternVLForConditionalGeneration, Qwen2 text model) as the reference.

    It shares no code with minivl: its own ViT, pixel_shuffle, projector, masked_scatter splice and Qwen2.
    """
    from transformers import InternVLConfig, InternVLForConditionalGeneration, Qwen2Config

    from test_intern_vit import _to_hf_config

    combo = ("qwen2", "300m")
    model, _, tokenizer = models(combo, dtype)
    config, state = model.config, load_state_dict(checkpoints[combo])
    text = {k: v for k, v in config.llm_config.to_dict().items()
            if k not in ("architectures", "auto_map", "transformers_version", "model_type", "torch_dtype")}
    hf_config = InternVLConfig(
        vision_config=_to_hf_config(config.vision_config),
        text_config=Qwen2Config(**text), image_token_id=tokenizer.token_to_id("<IMG_CONTEXT>"),
        image_seq_length=model.num_image_token, downsample_ratio=config.downsample_ratio,
        tie_word_embeddings=False)
    hf_config._attn_implementation = "eager"
    torch_dtype = torch.float64 if dtype == "float64" else torch.float32
    reference = InternVLForConditionalGeneration(hf_config).to(torch_dtype).eval()
    missing, unexpected = reference.load_state_dict(_to_transformers(config, state), strict=False)
    assert not missing and not unexpected, (missing, unexpected)

    pixel_values = image_tiles().astype(dtype)
    with torch.no_grad():
        features = reference.model.get_image_features(
            torch.from_numpy(pixel_values), vision_feature_layer=-1,
            vision_feature_select_strategy="default").pooler_output
    # transformers scales q after q·kᵀ and splits qkv: roundings differ per op (512 ulps, see top)
    rtol, atol = tol(dtype)
    c = assert_close(model.extract_feature(pixel_values), features, rtol=rtol, atol=atol,
                     what="extract_feature vs transformers InternVL")
    print(f"\nextract_feature vs transformers ({dtype}): {c}")

    input_ids = prompt_ids(tokenizer, model, len(pixel_values))
    with torch.no_grad():
        ref_logits = reference(input_ids=torch.from_numpy(input_ids),
                               pixel_values=torch.from_numpy(pixel_values)).logits
    logits = model.forward(pixel_values, input_ids).logits
    if dtype == "float64":
        # transformers' Qwen2RMSNorm hard-codes a float32 upcast, so its "float64" LLM rounds to float32
        # inside every norm: compare at float32 precision (256 ulps of float32 × logit scale 4)
        rtol, atol = tolerance("float32", 256, 256, scale=4.0)
    c = assert_close(logits, ref_logits, rtol=rtol, atol=atol, what="logits vs transformers InternVL")
    print(f"logits vs transformers ({dtype}): {c}")
    # the attention probabilities: values in [0, 1], so the logits' tolerance at scale 1
    prob_rtol, prob_atol = tolerance("float32", 256, 256, scale=1.0) if dtype == "float64" else tol(dtype, scale=1.0)
    with torch.no_grad():
        ref_probs = reference(input_ids=torch.from_numpy(input_ids), pixel_values=torch.from_numpy(pixel_values),
                              output_attentions=True).attentions
    probs = model.forward(pixel_values, input_ids, output_attentions=True).attentions
    assert len(probs) == len(ref_probs)
    for layer, (got, want) in enumerate(zip(probs, ref_probs)):
        c = assert_close(got, want, rtol=prob_rtol, atol=prob_atol,
                         what=f"attention probabilities vs transformers, layer {layer}")
        print(f"attention probabilities vs transformers ({dtype}), layer {layer}: {c}")


@pytest.mark.parametrize("combo", [("internlm2", "6b"), ("phi3", "300m")], ids=lambda c: f"{c[0]}-{c[1]}")
def test_torch_bfloat16_tracks_the_float64_gold(tmp_path, combo):
    """A bf16 checkpoint run in torch bf16 (as the released models run) vs the same weights in float64 NumPy."""
    path = write_tiny_internvl(tmp_path / "vl", llm=combo[0], vision=combo[1], dtype="bfloat16")
    gold, twin, tokenizer = minivl.load_model(path, "float64"), torch_impl.load_model(path, "bfloat16"), \
        Tokenizer.from_file(path)
    pixel_values = image_tiles()
    features = twin.extract_feature(torch.from_numpy(pixel_values))
    assert features.dtype == torch.bfloat16
    # every activation is stored in bf16 (8-bit significand, eps 2^-7): a few roundings of eps·|x|
    # survive through 3 ViT layers and mlp1. 4 ulps of bf16 relative, and 4 ulps of the feature scale
    # (~2) absolute; measured max 0.018 absolute on values up to 2.4
    rtol, atol = tolerance("bfloat16", 4, 4, scale=2.0)
    c = assert_close(features, gold.extract_feature(pixel_values.astype(np.float64)), rtol=rtol, atol=atol,
                     what="bf16 extract_feature vs float64")
    print(f"\n{combo} bf16 extract_feature vs float64: {c}")
    input_ids = prompt_ids(tokenizer, gold, len(pixel_values))
    twin.img_context_token_id = gold.img_context_token_id
    logits = twin.forward(torch.from_numpy(pixel_values), torch.from_numpy(input_ids)).logits
    assert logits.dtype == torch.float32           # the LM head's logits are float32 even in a bf16 run
    # two more LLM layers on top: 8 ulps of bf16 relative and of the logit scale (~4) absolute;
    # measured max 0.08 on logits up to 4.3
    rtol, atol = tolerance("bfloat16", 8, 8, scale=4.0)
    c = assert_close(logits, gold.forward(pixel_values.astype(np.float64), input_ids).logits, rtol=rtol, atol=atol,
                     what="bf16 logits vs float64")
    print(f"{combo} bf16 logits vs float64: {c}")


def test_image_file_to_answer_in_both_packages(models, tmp_path, monkeypatch):
    """The README flow: load_image(file) -> chat, for a 16-bit grayscale PNG (scaled, not clipped)."""
    from minivl.preprocess import load_image

    model, twin, tokenizer = models(("phi3", "300m"), "float64")
    for m in (model, twin):
        monkeypatch.setattr(m, "system_message", "You are InternVL.")
    path = tmp_path / "scan.png"
    ramp = (np.linspace(0, 65535, 150 * 40).reshape(40, 150)).astype(np.uint16)
    Image.fromarray(ramp).save(path)
    pixel_values, grid = load_image(path, max_num=6, image_size=56)
    assert grid == (4, 1) and pixel_values.shape == (5, 3, 56, 56)      # aspect 3.75: 4 tiles + thumbnail
    config = dict(max_new_tokens=4)
    answer = model.chat(tokenizer, pixel_values, "What is shown?", dict(config))
    assert twin.chat(tokenizer, torch.from_numpy(pixel_values), "What is shown?", dict(config)) == answer


@pytest.mark.parametrize("key", [("phi3", "300m"), ("internlm2", "6b")], ids=["phi3-300m", "internlm2-6b"])
def test_both_packages_build_the_same_tree(models, checkpoints, key):
    """The mirror rule for the chat model: vision_model / language_model / mlp1, module for module."""
    model, twin, _ = models(key, "float32")
    assert [(n, type(m).__name__) for n, m in model.named_modules()] == \
        [(n, type(m).__name__) for n, m in twin.named_modules()]
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in twin.state_dict().items()]
    config = model.config
    assert InternVLChatModel.expected_shapes(config) == TorchInternVLChatModel.expected_shapes(config) == \
        {k: tuple(v.shape) for k, v in load_state_dict(checkpoints[key]).items()}
    for chat_model in (model, twin):
        children = [name for name, _ in chat_model.named_modules() if name and "." not in name]
        assert children == ["vision_model", "language_model", "mlp1"]
        assert chat_model.mlp1[1].weight.shape[0] == config.llm_config.hidden_size
        assert chat_model.vision_model.encoder.layers[0].attn.proj.weight.shape[0] == config.vision_config.hidden_size
