"""minivl trace / minivl diff (minivl/trace.py, minivl_cli/commands/trace.py) and tools/trace_transformers.py.

* NumPy and torch_impl traces of tiny InternVL checkpoints agree (diff exit 0), in both directions;
* transformers' InternVLForConditionalGeneration on the same weights (the tiny checkpoint rewritten
  in its layout here, independently of minivl) agrees with minivl stage by stage, both directions;
* three deliberately broken ports are each caught at the stage where they were broken, with every
  earlier stage OK: pixel shuffle v1 where v2 is configured (pixel_shuffle), a thumbnail added for a
  single tile (pixel_values), a stale dynamic-NTK base (language_model.model.layers.0);
* the file format: round trip, order, metadata; named errors for a missing or foreign file.

Tolerance of every diff: the default, 512 ulps of float32 relative and of each stage's max |B|
(minivl.trace.DEFAULT_ULPS; the ledger docs/parity.md measures < 20 ulps between these
implementations). The breakages move values by O(1e-2) or more relative, 10⁵ ulps.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch

from minivl import trace
from minivl.errors import TraceError
from minivl_cli.cli import main
from minivl.tiny.internvl import write_tiny_internvl

PROMPT = "What is in the picture?"
# the v1 broken port triggers InternVL's own "transposed image" warning: expected here
pytestmark = pytest.mark.filterwarnings("ignore:In ps_version 'v1':UserWarning")


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = tmp_path_factory.mktemp("trace")
    trace.synthetic_image(130, 60).save(root / "wide.png")        # 2×1 grid + thumbnail with max_num 4
    trace.synthetic_image(56, 56, seed=1).save(root / "square.png")  # one tile: no thumbnail
    return root


@pytest.fixture(scope="module")
def checkpoints(root):
    return {llm: write_tiny_internvl(root / llm, llm=llm, seed=4) for llm in ("qwen2", "internlm2")}


def _trace(checkpoint, image, out, *extra):
    assert main(["trace", checkpoint, "--image", str(image), "--prompt", PROMPT, "--out", str(out), *extra]) == 0
    return str(out)


def _first_diverging(capsys) -> str | None:
    for line in capsys.readouterr().out.splitlines():
        if line.startswith("first divergence at stage "):
            return line[len("first divergence at stage "):].split(":")[0]
    return None


def _statuses(rows):
    return {row.name: row.status for row in rows}


# ----------------------------------------------------------------------------- NumPy vs torch_impl

@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_numpy_and_torch_traces_agree_both_ways(root, checkpoints, capsys, llm):
    a = _trace(checkpoints[llm], root / "wide.png", root / f"{llm}_np.safetensors")
    b = _trace(checkpoints[llm], root / "wide.png", root / f"{llm}_torch.safetensors", "--backend", "torch")
    capsys.readouterr()
    assert main(["diff", a, b]) == 0 and "all 16 shared stages agree" in capsys.readouterr().out
    assert main(["diff", b, a]) == 0


def test_trace_reads_internlm2s_tokenizer_model(tmp_path, root, capsys):
    """InternVL2-2B/-8B/-26B ship tokenizer.model and no tokenizer.json: the trace tokenizes the prompt with
    InternLM2's SentencePiece tokenizer (minivl.tokenizer.load_tokenizer), and NumPy and torch agree on it."""
    from minivl.tiny.sentencepiece import use_internlm2_tokenizer
    from minivl.tokenizer import load_tokenizer
    from minivl.tokenizer_internlm2 import InternLM2Tokenizer

    directory = use_internlm2_tokenizer(write_tiny_internvl(tmp_path / "vl_spm", llm="internlm2", seed=4))
    assert not os.path.exists(os.path.join(directory, "tokenizer.json"))
    a = _trace(directory, root / "wide.png", tmp_path / "spm_np.safetensors")
    b = _trace(directory, root / "wide.png", tmp_path / "spm_torch.safetensors", "--backend", "torch")
    capsys.readouterr()
    assert main(["diff", a, b]) == 0
    ids = trace.load_trace(a).stages["input_ids"][0].tolist()
    tokenizer = load_tokenizer(directory)
    assert isinstance(tokenizer, InternLM2Tokenizer)
    assert PROMPT in tokenizer.decode(ids) and ids.count(tokenizer.token_to_id("<IMG_CONTEXT>")) > 0


def test_trace_file_has_every_stage_in_order_and_the_metadata(root, checkpoints):
    path = _trace(checkpoints["qwen2"], root / "wide.png", root / "meta.safetensors")
    t = trace.load_trace(path)
    assert list(t.stages)[:3] == ["tile_grid", "pixel_values", "vision_model.embeddings"]
    assert [n for n in t.stages if n.startswith("vision_model.encoder.layers.")] == \
        [f"vision_model.encoder.layers.{i}" for i in range(3)]
    assert list(t.stages)[6:11] == ["select_layer", "pixel_shuffle", "mlp1", "input_ids", "image_token_positions"]
    assert list(t.stages)[-3:] == ["language_model.model.layers.1", "language_model.model.norm", "logits"]
    assert t.stages["tile_grid"].tolist() == [2, 1] and t.stages["pixel_values"].shape == (3, 3, 56, 56)
    # 3 tiles × 4 tokens per 56-px tile, all <IMG_CONTEXT>, contiguous
    positions = t.stages["image_token_positions"]
    assert len(positions) == 12 and np.all(np.diff(positions) == 1)
    context_id = t.stages["input_ids"][0, positions[0]]
    assert np.all(t.stages["input_ids"][0, positions] == context_id)
    # the image tokens of the merged embeddings are the mlp1 rows, in (tile, token) order
    np.testing.assert_array_equal(t.stages["inputs_embeds"][0, positions], t.stages["mlp1"].reshape(12, -1))
    assert t.metadata["dtype"] == "float32" and t.metadata["producer"] == "minivl (NumPy)"
    assert t.metadata["config_sha256"] == trace.config_sha256(checkpoints["qwen2"])
    assert set(json.loads(t.metadata["versions"])) >= {"minivl", "numpy"}
    assert t.metadata["prompt"] == PROMPT


def test_bare_internvit_trace_and_diff(root, capsys):
    from minivl.tiny.vision import write_tiny_vit

    vit = write_tiny_vit(root / "vit", "6b")
    a = _trace(vit, root / "wide.png", root / "vit_np.safetensors")
    b = _trace(vit, root / "wide.png", root / "vit_torch.safetensors", "--backend", "torch")
    stages = trace.load_trace(a).stages
    assert list(stages) == ["tile_grid", "pixel_values", "embeddings"] + [f"encoder.layers.{i}" for i in range(3)]
    capsys.readouterr()
    assert main(["diff", a, b]) == 0
    assert main(["trace", vit, "--image", str(root / "wide.png"), "--decode", "1",
                 "--out", str(root / "vit_decode.safetensors")]) == 1
    assert "a bare InternViT has none" in capsys.readouterr().err


# ----------------------------------------------------------------------------- deliberately broken ports

def _broken_trace(checkpoint, image, out, break_model=None, thumbnail_for_one_tile=False):
    """A NumPy trace from a port with one bug planted (the same code path `minivl trace` takes)."""
    import minivl
    from minivl.conversation import IMG_CONTEXT_TOKEN, build_query, encode, token_id
    from minivl.preprocess import dynamic_preprocess, open_image, to_pixel_values
    from minivl.tokenizer import Tokenizer

    model = minivl.load_model(checkpoint, "float32")
    if break_model is not None:
        break_model(model)
    pixel_values, grid, input_ids, _ = trace.internvl_inputs(checkpoint, model, str(image), PROMPT)
    if thumbnail_for_one_tile:
        # the bug of vllm #7160: a thumbnail appended although the grid has one tile
        picture = open_image(str(image))
        tiles = dynamic_preprocess(picture, max_num=12, image_size=56, use_thumbnail=False)
        assert len(tiles) == 1
        tiles.append(picture.resize((56, 56), resample=3))
        pixel_values = to_pixel_values(tiles, 56)
        tokenizer = Tokenizer.from_file(checkpoint)
        query = build_query(model.template, model.system_message, "<image>\n" + PROMPT, [], [len(tiles)],
                            model.num_image_token)
        input_ids = np.asarray([encode(tokenizer, query)], dtype=np.int64)
        model.img_context_token_id = token_id(tokenizer, IMG_CONTEXT_TOKEN)
    stages = trace.internvl_stages(model, pixel_values, input_ids, grid)
    trace.save_trace(out, trace.Trace(stages, {"producer": "a broken port", "dtype": "float32"}))
    return str(out)


def _use_v1(model):
    model.ps_version = "v1"           # config.json says v2


def _stale_ntk_base(model):
    # one earlier call longer than max_position_embeddings (512) enlarged the dynamic-NTK base; this
    # port keeps it for the next, short prompt, which a fresh reference run does not
    model.language_model.forward(input_ids=np.arange(600, dtype=np.int64)[None] % 200 + 20)


@pytest.mark.parametrize("llm, image, broken, expected_stage", [
    ("qwen2", "wide.png", dict(break_model=_use_v1), "pixel_shuffle"),
    ("qwen2", "square.png", dict(thumbnail_for_one_tile=True), "pixel_values"),
    ("internlm2", "wide.png", dict(break_model=_stale_ntk_base), "language_model.model.layers.0"),
], ids=["v1-pixel-shuffle", "thumbnail-for-one-tile", "stale-dynamic-ntk-base"])
def test_a_broken_port_is_caught_where_it_breaks(root, checkpoints, capsys, llm, image, broken, expected_stage):
    reference = _trace(checkpoints[llm], root / image, root / f"ref_{llm}_{image}.safetensors", "--backend", "torch")
    candidate = _broken_trace(checkpoints[llm], root / image, root / f"broken_{expected_stage}.safetensors", **broken)
    capsys.readouterr()
    assert main(["diff", candidate, reference]) == 1
    assert _first_diverging(capsys) == expected_stage
    rows = trace.diff_traces(trace.load_trace(candidate), trace.load_trace(reference))
    names = [row.name for row in rows]
    before = names[:names.index(expected_stage)]
    assert before and all(_statuses(rows)[name] == "OK" for name in before), _statuses(rows)
    first = trace.first_divergence(rows)
    if expected_stage == "pixel_values":
        assert first.detail == "shape (2, 3, 56, 56) in A vs (1, 3, 56, 56) in B"
    else:
        # where and by how much: the worst element is named and far outside the tolerance
        assert len(first.worst_index) == 3 and abs(first.candidate_value - first.reference_value) > 100 * first.allowed


def test_diff_output_names_index_and_size(root, checkpoints, capsys):
    reference = _trace(checkpoints["qwen2"], root / "wide.png", root / "ref_names.safetensors")
    candidate = _broken_trace(checkpoints["qwen2"], root / "wide.png", root / "v1_names.safetensors",
                              break_model=_use_v1)
    capsys.readouterr()
    assert main(["diff", candidate, reference]) == 1
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if line.startswith("first divergence"))
    assert line.startswith("first divergence at stage pixel_shuffle: at index (")
    assert "|A − B| = " in line and "allowed" in line and "elements outside" in line
    assert "| select_layer | 3×16×64 |" in out and out.count("| DIFF |") >= 2


# ----------------------------------------------------------------------------- transformers' InternVL port

def to_hf_internvl(minivl_dir, out_dir) -> str:
    """A minivl (= InternVL) chat checkpoint rewritten as transformers' InternVLForConditionalGeneration.

    Keys: vision_model.* -> model.vision_tower.* (qkv split into q/k/v_proj, norm1/2 ->
    layernorm_before/after, ls1/2 -> lambda_1/2), mlp1.{0,1,3} -> model.multi_modal_projector.
    {layer_norm, linear_1, linear_2}, language_model.model.* -> model.language_model.*,
    language_model.lm_head -> lm_head (test_internvl_chat._to_transformers, written from transformers'
    module tree, not from minivl).
    """
    import transformers

    from minivl.checkpoint import load_state_dict
    from minivl.config import load_config
    from minivl.conversation import IMG_CONTEXT_TOKEN
    from minivl.tokenizer import Tokenizer
    from test_intern_vit import _to_hf_config
    from test_internvl_chat import _to_transformers

    config = load_config(minivl_dir)
    hf = _to_transformers(config, load_state_dict(minivl_dir))
    text_config = {k: v for k, v in config.llm_config.to_dict().items()
                   if k not in ("architectures", "transformers_version")}
    hf_config = transformers.InternVLConfig(
        vision_config=_to_hf_config(config.vision_config),
        text_config=text_config, downsample_ratio=config.downsample_ratio, projector_hidden_act="gelu",
        vision_feature_layer=config.select_layer, vision_feature_select_strategy="default",
        image_token_id=Tokenizer.from_file(minivl_dir).token_to_id(IMG_CONTEXT_TOKEN),
        image_seq_length=config.num_image_token, tie_word_embeddings=False)
    model = transformers.InternVLForConditionalGeneration(hf_config).eval()
    missing, unexpected = model.load_state_dict(hf, strict=False)
    assert not missing and not unexpected, (missing, unexpected)
    model.save_pretrained(out_dir)
    shutil.copy(os.path.join(minivl_dir, "tokenizer.json"), out_dir)
    return os.fspath(out_dir)


@pytest.fixture(scope="module")
def hf_trace(root, checkpoints):
    pytest.importorskip("transformers")
    from _tools_util import load_tool

    hf_dir = to_hf_internvl(checkpoints["qwen2"], root / "qwen2_hf")
    inputs = _trace(checkpoints["qwen2"], root / "wide.png", root / "inputs_for_hf.safetensors")
    out = root / "hf.safetensors"
    assert load_tool("trace_transformers").main([hf_dir, "--inputs", inputs, "--out", str(out)]) == 0
    return str(out)


def test_transformers_trace_agrees_with_minivl_both_ways(root, checkpoints, hf_trace, capsys):
    ours = _trace(checkpoints["qwen2"], root / "wide.png", root / "ours_vs_hf.safetensors")
    hf = trace.load_trace(hf_trace)
    assert list(hf.stages) == list(trace.load_trace(ours).stages)
    assert hf.metadata["producer"].startswith("transformers ")
    capsys.readouterr()
    assert main(["diff", ours, hf_trace]) == 0
    assert "all 16 shared stages agree" in capsys.readouterr().out
    assert main(["diff", hf_trace, ours]) == 0
    # the comparison is not vacuous: the two differ in the last bits somewhere in the LLM
    rows = trace.diff_traces(trace.load_trace(ours), hf)
    assert max(row.max_abs for row in rows if row.name.startswith("language_model")) > 0


def test_v1_port_caught_against_transformers(root, checkpoints, hf_trace, capsys):
    candidate = _broken_trace(checkpoints["qwen2"], root / "wide.png", root / "v1_vs_hf.safetensors",
                              break_model=_use_v1)
    capsys.readouterr()
    assert main(["diff", candidate, hf_trace]) == 1
    assert _first_diverging(capsys) == "pixel_shuffle"


# ----------------------------------------------------------------------------- format and errors

def test_round_trip_keeps_order_dtype_and_values(tmp_path):
    stages = {"zeta": np.arange(6, dtype=np.float64).reshape(2, 3), "alpha": np.array([3, 1], np.int64),
              "mid": np.ones((1, 2), np.float32)}
    trace.save_trace(tmp_path / "t.safetensors", trace.Trace(stages, {"dtype": "float64", "prompt": "hi"}))
    back = trace.load_trace(tmp_path / "t.safetensors")
    assert list(back.stages) == ["zeta", "alpha", "mid"] and back.metadata["prompt"] == "hi"
    for name, value in stages.items():
        assert back.stages[name].dtype == value.dtype
        np.testing.assert_array_equal(back.stages[name], value)


def test_integer_stage_must_match_exactly_and_shapes_are_named():
    rows = trace.compare_stages({"input_ids": np.array([[1, 2, 4]]), "x": np.zeros((2, 2))},
                                {"input_ids": np.array([[1, 2, 3]]), "x": np.zeros((2, 3)), "y": np.ones(1)},
                                "float32")
    by_name = {row.name: row for row in rows}
    assert by_name["input_ids"].status == "DIFF" and by_name["input_ids"].worst_index == (0, 2)
    assert by_name["x"].detail == "shape (2, 2) in A vs (2, 3) in B"
    assert by_name["y"].status == "only in B"


def test_tolerance_is_dtype_aware():
    reference = {"h": np.linspace(1, 2, 50)}
    nudged = {"h": reference["h"] * (1 + 1e-5)}            # 84 float32 ulps, 4.5e10 float64 ulps
    assert trace.compare_stages(nudged, reference, "float32")[0].status == "OK"
    assert trace.compare_stages(nudged, reference, "float64")[0].status == "DIFF"
    assert trace.coarser_dtype("float64", "bfloat16") == "bfloat16"


def test_named_errors(tmp_path, checkpoints, capsys):
    assert main(["diff", str(tmp_path / "nope.safetensors"), str(tmp_path / "nope.safetensors")]) == 1
    assert "TraceError" in capsys.readouterr().err
    from minivl.checkpoint import write_safetensors

    write_safetensors(tmp_path / "weights.safetensors", {"w": np.zeros(2, np.float32)})
    assert main(["diff", str(tmp_path / "weights.safetensors"), str(tmp_path / "weights.safetensors")]) == 1
    assert "is not a minivl trace" in capsys.readouterr().err
    from minivl.tiny.llm import write_tiny_llm

    llm = write_tiny_llm(tmp_path / "llm", "llama")
    assert main(["trace", llm, "--image", "x.png", "--out", str(tmp_path / "t.safetensors")]) == 1
    assert "is a text-only LLM: it takes no --image" in capsys.readouterr().err
    bare = tmp_path / "no_tokenizer"
    shutil.copytree(checkpoints["qwen2"], bare)
    os.remove(bare / "tokenizer.json")
    trace.synthetic_image().save(tmp_path / "img.png")
    assert main(["trace", str(bare), "--image", str(tmp_path / "img.png"), "--out", str(tmp_path / "t.st")]) == 1
    assert "has neither tokenizer.json nor tokenizer.model" in capsys.readouterr().err
    with pytest.raises(TraceError, match="no stages"):
        trace.save_trace(tmp_path / "empty.safetensors", trace.Trace({}, {}))


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_stages_are_what_the_forward_computes(root, checkpoints, llm):
    """Computed from outside through the public pieces, the stages equal extract_feature / forward bit for bit."""
    import minivl

    model = minivl.load_model(checkpoints[llm], "float32")
    pixel_values, grid, input_ids, _ = trace.internvl_inputs(checkpoints[llm], model, str(root / "wide.png"), PROMPT)
    stages = trace.internvl_stages(model, pixel_values, input_ids, grid)
    np.testing.assert_array_equal(stages["mlp1"], model.extract_feature(pixel_values))
    out = model.forward(pixel_values, input_ids, output_hidden_states=True)
    np.testing.assert_array_equal(stages["logits"], out.logits)
    np.testing.assert_array_equal(stages["inputs_embeds"], out.hidden_states[0])
    np.testing.assert_array_equal(stages["language_model.model.norm"], out.hidden_states[-1])
    vit = model.vision_model.forward(pixel_values)
    np.testing.assert_array_equal(stages["vision_model.encoder.layers.2"], vit.last_hidden_state)


def test_transformers_image_processor_tiles_like_internvl(root, checkpoints, hf_trace, capsys):
    """--image-processor: transformers' GotOcr2 processor tiles and normalises the image itself."""
    from _tools_util import load_tool

    inputs = trace.load_trace(root / "inputs_for_hf.safetensors")
    assert inputs.metadata["max_num"] == "12"
    out = root / "hf_processor.safetensors"
    hf_dir = str(root / "qwen2_hf")
    assert load_tool("trace_transformers").main([hf_dir, "--inputs", str(root / "inputs_for_hf.safetensors"),
                                                 "--out", str(out), "--image-processor"]) == 0
    produced = trace.load_trace(out)
    assert produced.metadata["pixels_from"] == "GotOcr2ImageProcessorPil"
    rows = {row.name: row for row in trace.diff_traces(produced, inputs)}
    assert rows["tile_grid"].status == "OK" and rows["pixel_values"].status == "OK", rows["pixel_values"]
    capsys.readouterr()
    assert main(["diff", str(out), str(root / "inputs_for_hf.safetensors")]) == 0



# ----------------------------------------------------------------------------- text-only LLMs

LLM_STAGE_NAMES = {  # family -> (embedding, layer list, final norm): the checkpoint's own module paths
    "llama": ("model.embed_tokens", "model.layers", "model.norm"),
    "qwen2": ("model.embed_tokens", "model.layers", "model.norm"),
    "phi3": ("model.embed_tokens", "model.layers", "model.norm"),
    "internlm2": ("model.tok_embeddings", "model.layers", "model.norm"),
    "mpt_alibi": ("transformer.wte", "transformer.blocks", "transformer.norm_f"),
    "mpt_learned": ("transformer.wte", "transformer.blocks", "transformer.norm_f"),
}
IDS = "3,1,4,1,5,9,2,6,5"


@pytest.fixture(scope="module")
def llms(tmp_path_factory):
    from minivl.tiny.llm import write_tiny_llm

    root = tmp_path_factory.mktemp("trace_llm")
    return {family: write_tiny_llm(root / family, family, seed=6) for family in LLM_STAGE_NAMES}


@pytest.mark.parametrize("family", sorted(LLM_STAGE_NAMES))
def test_text_only_llm_traces_numpy_and_torch_agree_under_the_checkpoints_names(tmp_path, llms, capsys, family):
    a, b = tmp_path / "np.safetensors", tmp_path / "torch.safetensors"
    assert main(["trace", llms[family], "--ids", IDS, "--out", str(a)]) == 0
    assert main(["trace", llms[family], "--ids", IDS, "--out", str(b), "--backend", "torch"]) == 0
    embed, layers, norm = LLM_STAGE_NAMES[family]
    t = trace.load_trace(a)
    n_layers = json.load(open(os.path.join(llms[family], "config.json"))).get("num_hidden_layers") or \
        json.load(open(os.path.join(llms[family], "config.json")))["n_layers"]
    assert list(t.stages) == ["input_ids", embed, *[f"{layers}.{i}" for i in range(n_layers)], norm, "logits"]
    assert t.stages["input_ids"].tolist() == [[int(i) for i in IDS.split(",")]]
    assert t.metadata["model_type"] and "image" not in t.metadata
    capsys.readouterr()
    assert main(["diff", str(a), str(b)]) == 0
    assert f"all {n_layers + 4} shared stages agree" in capsys.readouterr().out
    assert main(["diff", str(b), str(a)]) == 0


def test_text_only_stages_are_what_the_forward_computes(llms):
    """The stages equal the forward's own output and the model's pieces applied by hand, bit for bit."""
    import minivl

    model = minivl.load_model(llms["qwen2"], "float32")
    ids = np.asarray([[int(i) for i in IDS.split(",")]])
    stages = trace.decoder_stages(model, ids)
    np.testing.assert_array_equal(stages["logits"], model(input_ids=ids).logits)
    np.testing.assert_array_equal(stages["model.embed_tokens"], model.embed_tokens(ids))
    np.testing.assert_array_equal(stages["model.norm"], model.final_norm(stages["model.layers.1"]))
    np.testing.assert_array_equal(stages["logits"], model.unembed(stages["model.norm"]))


def test_a_broken_llm_port_is_caught_at_the_layer_it_breaks(tmp_path, llms, capsys):
    """A port whose layer 1 uses the wrong RMSNorm epsilon (1e-2 for the config's 1e-6): every earlier stage OK."""
    import minivl

    ids = np.asarray([[int(i) for i in IDS.split(",")]])
    good = minivl.load_model(llms["llama"], "float32")
    broken = minivl.load_model(llms["llama"], "float32")
    broken.get_submodule("model.layers.1.post_attention_layernorm").eps = 1e-2
    for name, model in (("good", good), ("broken", broken)):
        trace.save_trace(tmp_path / f"{name}.safetensors", trace.Trace(trace.decoder_stages(model, ids), {}))
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "broken.safetensors"), str(tmp_path / "good.safetensors")]) == 1
    assert _first_diverging(capsys) == "model.layers.1"
    rows = trace.diff_traces(trace.load_trace(tmp_path / "broken.safetensors"),
                             trace.load_trace(tmp_path / "good.safetensors"))
    assert [row.status for row in rows[:3]] == ["OK", "OK", "OK"]  # input_ids, embedding, layer 0


@pytest.mark.parametrize("family", ["llama", "qwen2", "mpt_alibi"])
def test_transformers_text_only_trace_agrees_with_minivl(tmp_path, llms, capsys, family):
    """tools/trace_transformers.py on a text-only trace: AutoModelForCausalLM on the same checkpoint, the same
    input_ids, its own module names, which are the checkpoint's and so minivl's; the decode.* stages through
    transformers' own KV cache."""
    pytest.importorskip("transformers")
    from _decoder_util import hf_copy
    from _tools_util import load_tool

    ours = tmp_path / "ours.safetensors"
    assert main(["trace", llms[family], "--ids", IDS, "--decode", "3", "--out", str(ours)]) == 0
    directory = llms[family]
    if family.startswith("mpt"):  # transformers' MPT config wants attn_pdrop 0 (test_models_transformers.py)
        directory = hf_copy(directory, tmp_path / "hf", lambda c: c["attn_config"].__setitem__("attn_pdrop", 0))
    hf = tmp_path / "hf.safetensors"
    assert load_tool("trace_transformers").main([directory, "--inputs", str(ours), "--out", str(hf)]) == 0
    theirs = trace.load_trace(hf)
    assert list(theirs.stages) == list(trace.load_trace(ours).stages)
    assert theirs.metadata["producer"].startswith("transformers ") and theirs.metadata["decode_steps"] == "3"
    assert theirs.stages["decode.logits"].shape[1] == 3
    capsys.readouterr()
    assert main(["diff", str(ours), str(hf)]) == 0 and "shared stages agree" in capsys.readouterr().out
    assert main(["diff", str(hf), str(ours)]) == 0


@pytest.mark.parametrize("family", sorted(LLM_STAGE_NAMES))
@pytest.mark.parametrize("backend", ["numpy", "torch"])
def test_decode_stages_are_the_prefills_last_rows_through_the_cache(tmp_path, llms, capsys, family, backend):
    """--decode 3: the last 3 of 9 tokens one at a time through the KV cache. Step k computes what row 6 + k of
    the prefill computes, so each decode.* stage equals the prefill stage's last 3 rows within diff's default
    budget (512 ulps of float32, relative and of the stage's max). Measured here: at most 11 ulps of a
    stage's max |value| (Phi-3 in torch; 2.5-7 for the others), since only the summation orders of the
    GEMMs (one row against nine) and of the softmax differ."""
    out = tmp_path / "decode.safetensors"
    assert main(["trace", llms[family], "--ids", IDS, "--decode", "3", "--backend", backend, "--out", str(out)]) == 0
    assert "the last 3 through the KV cache" in capsys.readouterr().out
    t = trace.load_trace(out)
    prefill = [name for name in t.stages if not name.startswith("decode.") and name != "input_ids"]
    assert [name for name in t.stages if name.startswith("decode.")] == ["decode." + name for name in prefill]
    assert t.metadata["decode_steps"] == "3"
    decode = {name: t.stages["decode." + name] for name in prefill}
    last_rows = {name: t.stages[name][:, -3:] for name in prefill}
    rows = trace.compare_stages(decode, last_rows, "float32")
    assert [row.status for row in rows] == ["OK"] * len(prefill), trace.format_rows(rows)


def test_a_port_with_a_decode_only_bug_is_caught_at_the_first_decode_layer(tmp_path, llms, capsys):
    """A port that forgets the cache's length in its RoPE positions (every cached token at position 0):
    its prefill and its decode embedding agree, its first cached layer does not."""
    import minivl

    ids = np.asarray([[int(i) for i in IDS.split(",")]])
    good, broken = minivl.load_model(llms["llama"], "float32"), minivl.load_model(llms["llama"], "float32")
    positions = broken.positions
    broken.positions = lambda hidden, position_ids, attention_mask, past_len: positions(hidden, position_ids,
                                                                                         attention_mask, 0)
    for name, model in (("good", good), ("broken", broken)):
        stages = trace.decoder_stages(model, ids)
        stages.update(trace.decoder_decode_stages(model, ids, 3))
        trace.save_trace(tmp_path / f"{name}.safetensors", trace.Trace(stages, {}))
    capsys.readouterr()
    assert main(["diff", str(tmp_path / "broken.safetensors"), str(tmp_path / "good.safetensors")]) == 1
    assert _first_diverging(capsys) == "decode.model.layers.0"
    rows = trace.diff_traces(trace.load_trace(tmp_path / "broken.safetensors"),
                             trace.load_trace(tmp_path / "good.safetensors"))
    assert all(row.status == "OK" for row in rows if not row.name.startswith("decode.model.layers")
               and not row.name.startswith(("decode.model.norm", "decode.logits")))


def test_text_only_trace_named_errors(tmp_path, llms, checkpoints, root, capsys):
    out = str(tmp_path / "t.safetensors")
    for argv, fragment in [
        ([llms["llama"], "--out", out], "has no tokenizer"),                         # no tokenizer, no --ids
        ([llms["llama"], "--ids", "1,x", "--out", out], "--ids must be comma-separated integers"),
        ([llms["llama"], "--ids", "1,99999", "--out", out], "outside the vocabulary"),
        ([llms["llama"], "--ids", "1", "--prompt", "hi", "--out", out], "not both"),
        ([llms["llama"], "--ids", "1", "--max-num", "2", "--out", out], "a text-only LLM has none"),
        ([checkpoints["qwen2"], "--out", out], "needs --image PATH"),
        ([checkpoints["qwen2"], "--image", str(root / "wide.png"), "--ids", "1", "--out", out], "--ids is for text-only"),
        ([checkpoints["qwen2"], "--image", str(root / "wide.png"), "--decode", "100", "--out", out],
         "the last 100 tokens of the prompt include image tokens"),
        ([llms["llama"], "--ids", "1,2,3", "--decode", "3", "--out", out], "N must be in [1, 2]"),
        ([llms["llama"], "--ids", "1,2,3", "--decode", "0", "--out", out], "N must be in [1, 2]"),
    ]:
        assert main(["trace", *argv]) == 1, argv
        err = capsys.readouterr().err
        assert fragment in err and err.count("\n") == 1, (argv, err)
        assert not os.path.exists(out)


@pytest.mark.parametrize("llm", ["qwen2", "internlm2"])
def test_internvl_decode_stages_numpy_torch_and_the_prefills_last_rows(root, checkpoints, capsys, llm):
    """InternVL with --decode 3: the merged text + image embeddings of all but the last 3 prompt tokens
    prefilled into the language model's cache, then those 3 text tokens one at a time. NumPy and torch agree,
    and each decode.* stage equals the prefill's last 3 rows (diff's default budget, as for a bare LLM)."""
    a = _trace(checkpoints[llm], root / "wide.png", root / f"{llm}_decode_np.safetensors", "--decode", "3")
    b = _trace(checkpoints[llm], root / "wide.png", root / f"{llm}_decode_torch.safetensors", "--decode", "3",
               "--backend", "torch")
    capsys.readouterr()
    assert main(["diff", a, b]) == 0 and "all 21 shared stages agree" in capsys.readouterr().out
    t = trace.load_trace(a)
    llm_stages = ["inputs_embeds", "language_model.model.layers.0", "language_model.model.layers.1",
                  "language_model.model.norm", "logits"]
    assert [name for name in t.stages if name.startswith("decode.")] == ["decode." + name for name in llm_stages]
    rows = trace.compare_stages({name: t.stages["decode." + name] for name in llm_stages},
                                {name: t.stages[name][:, -3:] for name in llm_stages}, "float32")
    assert [row.status for row in rows] == ["OK"] * 5, trace.format_rows(rows)


def test_internvl_decode_stages_agree_with_transformers(root, checkpoints, capsys):
    """transformers' InternVLForConditionalGeneration: the prompt but its last 3 tokens (image included) into
    its own KV cache, then the 3 steps; every stage, prefill and decode, agrees with minivl."""
    pytest.importorskip("transformers")
    from _tools_util import load_tool

    hf_dir = to_hf_internvl(checkpoints["qwen2"], root / "qwen2_hf_decode")
    ours = _trace(checkpoints["qwen2"], root / "wide.png", root / "decode_vs_hf.safetensors", "--decode", "3")
    out = root / "hf_decode.safetensors"
    assert load_tool("trace_transformers").main([hf_dir, "--inputs", ours, "--out", str(out)]) == 0
    hf = trace.load_trace(out)
    assert list(hf.stages) == list(trace.load_trace(ours).stages) and hf.metadata["decode_steps"] == "3"
    capsys.readouterr()
    assert main(["diff", ours, str(out)]) == 0 and "all 21 shared stages agree" in capsys.readouterr().out
    assert main(["diff", str(out), ours]) == 0
