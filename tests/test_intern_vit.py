"""InternViT: minivl/models/intern_vit.py (NumPy) against torch_impl/models/intern_vit.py, per layer.

Both flavours (300M: LayerNorm, qkv bias; 6B: RMSNorm, qk-norm, head_dim 12 so the q-scale order
matters), float32 and float64, native and non-native input sizes (position-table interpolation),
eager vs sdpa, the checkpoint layout, the InternVL `vision_model.` prefix, and the error paths.
Independent references: torch's own Conv2d for the patch embedding, and a hand-written op-by-op
transcription of the reference's naive attention for qk-norm.
"""
import os

import numpy as np
import pytest
import torch

import minivl
import torch_impl
from minivl.checkpoint import load_state_dict
from minivl.config import InternVisionConfig
from minivl.errors import CheckpointError, ConfigError, DeviceError, ShapeError
from minivl.models.intern_vit import InternVisionModel, patch_embed
from minivl.testing import assert_close, compare, tolerance
from minivl.tiny.vision import tiny_vit_config, write_tiny_vit
from torch_impl.models.intern_vit import InternVisionModel as TorchInternVisionModel
from tests.conftest import requires_cuda

FLAVOURS = ["300m", "6b"]
DTYPES = {"float32": (np.float32, torch.float32), "float64": (np.float64, torch.float64)}

# Tolerance of the per-layer comparisons, in ulps of the dtype:
# NumPy and torch run the same ops in the same order; what differs is the summation order inside
# matmuls (BLAS blocking; C = 64/72, I = 256/288 terms), torch's Conv2d vs our patch matmul, and
# erf/exp implementations (~1 ulp). Three layers compound this, so 128 ulps relative and an absolute
# floor of 128 ulps of the hidden state's typical magnitude (~1.4): ≈ 2e-5 in float32, 4e-14 in
# float64. Measured worst cases (printed with -s) are 7e-6 and 9e-15, 3-5× inside.
LAYER_ULPS = 128


def _tiny(tmp_path, flavour, **overrides):
    directory = write_tiny_vit(tmp_path / flavour, flavour=flavour, dtype="float64", **overrides)
    return directory, InternVisionConfig.from_pretrained(directory), load_state_dict(directory)


def _pixels(rng, batch, height, width, dtype):
    return rng.standard_normal((batch, 3, height, width)).astype(dtype)


@pytest.mark.parametrize("flavour", FLAVOURS)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("size", [(56, 56), (84, 42)], ids=["native", "resized-table"])
def test_numpy_matches_torch_per_layer(tmp_path, rng, flavour, dtype, size):
    np_dtype, torch_dtype = DTYPES[dtype]
    _, config, state = _tiny(tmp_path, flavour)
    ours = InternVisionModel.from_state_dict(config, state, dtype)
    theirs = TorchInternVisionModel.from_state_dict(config, state, torch_dtype)
    pixels = _pixels(rng, 2, *size, np_dtype)
    out = ours(pixels, output_hidden_states=True, output_attentions=True)
    with torch.no_grad():
        ref = theirs(torch.from_numpy(pixels), output_hidden_states=True, output_attentions=True)
    assert len(out.hidden_states) == config.num_hidden_layers + 1  # embeddings + each layer
    grid = (size[0] // 14) * (size[1] // 14)
    assert out.last_hidden_state.shape == (2, 1 + grid, config.hidden_size)
    # the scale comes from the torch reference, never from the output under test (an inf or NaN there
    # would otherwise make atol inf/NaN and every comparison pass)
    scale = float(ref.hidden_states[-1].abs().mean())
    rtol, atol = tolerance(dtype, LAYER_ULPS, LAYER_ULPS, scale=scale)
    errors = []
    for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert a.dtype == np_dtype
        errors.append(assert_close(a, r, rtol=rtol, atol=atol, what=f"{flavour} {dtype} hidden_states[{i}]").max_abs)
    for i, (a, r) in enumerate(zip(out.attentions, ref.attentions)):
        # probabilities are in [0, 1]: the same ulps, absolute
        assert_close(a, r, rtol=rtol, atol=tolerance(dtype, LAYER_ULPS)[1], what=f"attentions[{i}]")
    assert_close(out.pooler_output, ref.pooler_output, rtol=rtol, atol=atol, what="pooler_output")
    print(f"\n{flavour} {dtype} {size}: per-layer max |numpy - torch| = "
          + ", ".join(f"{e:.2e}" for e in errors))
    # every layer must actually change the stream (otherwise the comparison proves little)
    for i in range(1, len(out.hidden_states)):
        assert np.abs(out.hidden_states[i] - out.hidden_states[i - 1]).mean() > 0.05 * scale


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_sdpa_backend_matches_eager(tmp_path, rng, flavour):
    _, config, state = _tiny(tmp_path, flavour)
    pixels = torch.from_numpy(_pixels(rng, 2, 56, 56, np.float32))
    eager = TorchInternVisionModel.from_state_dict(config, state, "float32", attn_implementation="eager")
    sdpa = TorchInternVisionModel.from_state_dict(config, state, "float32", attn_implementation="sdpa")
    with torch.no_grad():
        a = eager(pixels).last_hidden_state
        b = sdpa(pixels).last_hidden_state
    # tolerance: sdpa scales q and k by √scale each and fuses the softmax; float32 rounding only
    rtol, atol = tolerance("float32", LAYER_ULPS, LAYER_ULPS, scale=float(a.abs().mean()))
    assert_close(b, a, rtol=rtol, atol=atol, what=f"{flavour} sdpa vs eager")


@requires_cuda
@pytest.mark.parametrize("flavour", FLAVOURS)
def test_flash_backend_matches_eager_on_cuda(tmp_path, rng, flavour):
    _, config, state = _tiny(tmp_path, flavour)
    pixels = torch.from_numpy(_pixels(rng, 2, 56, 56, np.float32)).cuda()
    eager = TorchInternVisionModel.from_state_dict(config, state, "float32", device="cuda")
    flash = TorchInternVisionModel.from_state_dict(config, state, "bfloat16", device="cuda",
                                                   attn_implementation="flash")
    with torch.no_grad():
        a = eager(pixels).last_hidden_state
        b = flash(pixels.bfloat16()).last_hidden_state
    # tolerance: a bfloat16 model against float32: 3 layers of bf16 rounding, ~16 ulps of bf16
    rtol, atol = tolerance("bfloat16", 16, 16, scale=float(a.abs().mean()))
    assert_close(b.float(), a, rtol=rtol, atol=atol, what=f"{flavour} flash bf16 vs eager fp32")


def test_flash_backend_refuses_cpu_float32(tmp_path, rng):
    _, config, state = _tiny(tmp_path, "300m")
    model = TorchInternVisionModel.from_state_dict(config, state, "float32", attn_implementation="flash")
    with pytest.raises(DeviceError, match="flash"):
        model(torch.from_numpy(_pixels(rng, 1, 56, 56, np.float32)))


def test_patch_embedding_matmul_equals_conv2d(rng):
    """The stride-14 conv written as a matmul over flattened patches is the same linear map."""
    weight = rng.standard_normal((8, 3, 14, 14))
    bias = rng.standard_normal(8)
    pixels = rng.standard_normal((2, 3, 28, 42))
    ours = patch_embed(pixels, weight, bias)  # [2, 6, 8]
    ref = torch.nn.functional.conv2d(torch.from_numpy(pixels), torch.from_numpy(weight), torch.from_numpy(bias),
                                     stride=14).flatten(2).transpose(1, 2)
    # tolerance: float64, 588-term dot products in a different order: 64 ulps
    rtol, atol = tolerance("float64", 64, 64, scale=float(ref.abs().max()))
    assert_close(ours, ref, rtol=rtol, atol=atol, what="patch embedding")


def test_qk_norm_is_one_rmsnorm_over_all_heads(tmp_path, rng):
    """6B attention against a direct transcription of InternVL's `_naive_attn` (MIV:210-227) in torch."""
    _, config, state = _tiny(tmp_path, "6b")
    model = InternVisionModel.from_state_dict(config, state, "float64")
    layer = model.encoder.layers[0]

    x = rng.standard_normal((2, 17, config.hidden_size))
    ours, _ = layer.attn(x)
    t = {k: torch.from_numpy(v) for k, v in layer.state_dict().items()}
    B, N, C = x.shape
    H, D = config.num_attention_heads, C // config.num_attention_heads
    qkv = (torch.from_numpy(x) @ t["attn.qkv.weight"].T).reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)

    def rms(y, w):  # InternRMSNorm over the flattened (heads·D) axis
        return w * (y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + config.layer_norm_eps))

    q = rms(q.transpose(1, 2).flatten(2), t["attn.q_norm.weight"]).view(B, N, H, D).transpose(1, 2)
    k = rms(k.transpose(1, 2).flatten(2), t["attn.k_norm.weight"]).view(B, N, H, D).transpose(1, 2)
    attn = ((q * D ** -0.5) @ k.transpose(-2, -1)).softmax(-1)
    ref = (attn @ v).transpose(1, 2).reshape(B, N, C) @ t["attn.proj.weight"].T + t["attn.proj.bias"]
    # tolerance: float64, same math, different reduction orders: 256 ulps
    rtol, atol = tolerance("float64", 256, 256, scale=float(ref.abs().mean()))
    assert_close(ours, ref, rtol=rtol, atol=atol, what="6B attention vs transcription")
    # a per-head RMSNorm (the tempting mistake) gives a visibly different result: the test can fail
    qh = qkv[0]
    per_head = qh * torch.rsqrt(qh.pow(2).mean(-1, keepdim=True) + config.layer_norm_eps)
    full = qh.transpose(1, 2).flatten(2)
    full = (full * torch.rsqrt(full.pow(2).mean(-1, keepdim=True) + config.layer_norm_eps)).view(B, N, H, D)
    assert (per_head - full.transpose(1, 2)).abs().max() > 1e-2


def test_load_model_both_packages_and_vision_prefix(tmp_path, rng):
    directory, config, state = _tiny(tmp_path, "300m")
    pixels = _pixels(rng, 1, 56, 56, np.float32)
    np_model = minivl.load_model(directory)
    torch_model = torch_impl.load_model(directory)
    assert isinstance(np_model, InternVisionModel) and isinstance(torch_model, TorchInternVisionModel)
    # an InternVL checkpoint nests the tower under vision_model. next to mlp1./language_model. keys
    nested = {f"vision_model.{k}": v for k, v in state.items()}
    nested["mlp1.0.weight"] = np.ones(4 * config.hidden_size)
    prefixed = InternVisionModel.from_state_dict(config, nested, "float32")
    a = np_model(pixels).last_hidden_state
    b = prefixed(pixels).last_hidden_state
    np.testing.assert_array_equal(a, b)  # tolerance 0: identical weights, identical code
    with torch.no_grad():
        c = torch_model(torch.from_numpy(pixels)).last_hidden_state
    rtol, atol = tolerance("float32", LAYER_ULPS, LAYER_ULPS, scale=float(c.abs().mean()))  # scale of the reference
    assert_close(a, c, rtol=rtol, atol=atol, what="loaded numpy vs torch")


def test_bf16_checkpoint_loads_upcast(tmp_path, rng):
    from safetensors.torch import load_file

    directory = write_tiny_vit(tmp_path / "bf16", flavour="6b", dtype="bfloat16")
    model = minivl.load_model(directory, dtype="float32")
    # independent reader (the safetensors package) + torch's bf16 -> float32 cast: bf16 -> float32 is
    # exact, so every tensor must be bit-identical (tolerance 0)
    reference = load_file(os.path.join(directory, "model.safetensors"))
    params = model.state_dict()
    assert set(reference) == set(params) and {t.dtype for t in reference.values()} == {torch.bfloat16}
    for name, tensor in reference.items():
        assert params[name].dtype == np.float32, name
        np.testing.assert_array_equal(params[name], tensor.float().numpy(), err_msg=name)
    pixels = _pixels(rng, 1, 56, 56, np.float32)
    out = model(pixels).last_hidden_state
    with torch.no_grad():
        ref = torch_impl.load_model(directory, dtype="float32")(torch.from_numpy(pixels)).last_hidden_state
    # same float32 weights, NumPy vs torch: the per-layer budget of test_numpy_matches_torch_per_layer
    rtol, atol = tolerance("float32", LAYER_ULPS, LAYER_ULPS, scale=float(ref.abs().mean()))
    assert_close(out, ref, rtol=rtol, atol=atol, what="bf16 checkpoint, numpy vs torch")


def test_expected_shapes_follow_the_flavour():
    shapes_300m = InternVisionModel.expected_shapes(tiny_vit_config("300m"))
    shapes_6b = InternVisionModel.expected_shapes(tiny_vit_config("6b"))
    assert "encoder.layers.0.attn.qkv.bias" in shapes_300m and "encoder.layers.0.norm1.bias" in shapes_300m
    assert "encoder.layers.0.attn.q_norm.weight" not in shapes_300m
    assert "encoder.layers.0.attn.q_norm.weight" in shapes_6b and shapes_6b["encoder.layers.0.attn.q_norm.weight"] == (72,)
    assert "encoder.layers.0.attn.qkv.bias" not in shapes_6b and "encoder.layers.0.norm1.bias" not in shapes_6b
    assert shapes_6b["embeddings.position_embedding"] == (1, 1 + 4 * 4, 72)
    assert TorchInternVisionModel.expected_shapes(tiny_vit_config("6b")) == shapes_6b


def test_bad_inputs_raise_named_errors(tmp_path, rng):
    _, config, state = _tiny(tmp_path, "300m")
    model = InternVisionModel.from_state_dict(config, state, "float32")
    with pytest.raises(ShapeError, match="multiples of patch_size=14"):
        model(_pixels(rng, 1, 50, 56, np.float32))
    with pytest.raises(ShapeError, match=r"\[batch, 3, height, width\]"):
        model(rng.standard_normal((3, 56, 56)).astype(np.float32))
    with pytest.raises(ShapeError, match="normalised floats"):
        model(np.zeros((1, 3, 56, 56), np.uint8))
    with pytest.raises(CheckpointError, match="no final norm"):
        model(_pixels(rng, 1, 56, 56, np.float32), apply_final_norm=True)
    broken = dict(state)
    del broken["encoder.layers.1.ls2"]
    broken["encoder.layers.0.attn.qkv.weight"] = broken["encoder.layers.0.attn.qkv.weight"][:10]
    with pytest.raises(CheckpointError, match="ls2") as excinfo:
        InternVisionModel.from_state_dict(config, broken, "float32")
    assert "qkv.weight" in str(excinfo.value)  # every problem listed at once
    with pytest.raises(ConfigError, match="float32 or float64"):
        InternVisionModel.from_state_dict(config, state, "float16")
    with pytest.raises(ConfigError, match="attn_implementation"):
        TorchInternVisionModel(config, attn_implementation="magic")
    with pytest.raises(ShapeError, match="multiples of patch_size=14"):
        TorchInternVisionModel.from_state_dict(config, state)(torch.zeros(1, 3, 50, 56))


# ----------------------------------------------------------------------------------------------
# independent reference: transformers' own port of InternViT (InternVLVisionModel, transformers 5.x)
# ----------------------------------------------------------------------------------------------

def _to_hf(config, state):
    """Our (= InternVL's) keys -> transformers' InternVLVisionModel keys; qkv split into q/k/v_proj."""
    C = config.hidden_size
    hf = {
        "embeddings.cls_token": state["embeddings.class_embedding"],
        "embeddings.patch_embeddings.projection.weight": state["embeddings.patch_embedding.weight"],
        "embeddings.patch_embeddings.projection.bias": state["embeddings.patch_embedding.bias"],
        "embeddings.position_embeddings": state["embeddings.position_embedding"],
    }
    for i in range(config.num_hidden_layers):
        ours, theirs = f"encoder.layers.{i}.", f"encoder.layer.{i}."
        for j, part in enumerate("qkv"):
            hf[theirs + f"attention.{part}_proj.weight"] = state[ours + "attn.qkv.weight"][j * C:(j + 1) * C]
            if config.qkv_bias:
                hf[theirs + f"attention.{part}_proj.bias"] = state[ours + "attn.qkv.bias"][j * C:(j + 1) * C]
        if config.qk_normalization:
            hf[theirs + "attention.q_norm.weight"] = state[ours + "attn.q_norm.weight"]
            hf[theirs + "attention.k_norm.weight"] = state[ours + "attn.k_norm.weight"]
        hf[theirs + "attention.projection_layer.weight"] = state[ours + "attn.proj.weight"]
        hf[theirs + "attention.projection_layer.bias"] = state[ours + "attn.proj.bias"]
        for part in ("fc1", "fc2"):
            for leaf in ("weight", "bias"):
                hf[theirs + f"mlp.{part}.{leaf}"] = state[ours + f"mlp.{part}.{leaf}"]
        for norm, hf_norm in (("norm1", "layernorm_before"), ("norm2", "layernorm_after")):
            for leaf in ("weight", "bias"):
                if ours + f"{norm}.{leaf}" in state:
                    hf[theirs + f"{hf_norm}.{leaf}"] = state[ours + f"{norm}.{leaf}"]
        hf[theirs + "lambda_1"] = state[ours + "ls1"]
        hf[theirs + "lambda_2"] = state[ours + "ls2"]
    return {k: torch.from_numpy(np.array(v)) for k, v in hf.items()}


def _to_hf_config(config):
    """Our InternVisionConfig as transformers' InternVLVisionConfig (eager attention, mean pooling)."""
    from transformers import InternVLVisionConfig

    return InternVLVisionConfig(
        hidden_size=config.hidden_size, num_hidden_layers=config.num_hidden_layers,
        num_attention_heads=config.num_attention_heads, intermediate_size=config.intermediate_size,
        attention_bias=config.qkv_bias, use_qk_norm=config.qk_normalization, norm_type=config.norm_type,
        layer_norm_eps=config.layer_norm_eps, image_size=config.image_size, patch_size=config.patch_size,
        use_mean_pooling=True, attn_implementation="eager")


# transformers' InternVLVisionRMSNorm (like InternVL's InternRMSNorm) hard-codes float32, so a float64
# 6B run there is not a float64 run: compare the 6B flavour in float32 only.
@pytest.mark.parametrize("flavour,dtype", [("300m", "float64"), ("300m", "float32"), ("6b", "float32")])
@pytest.mark.parametrize("size", [(56, 56), (84, 42)], ids=["native", "resized-table"])
def test_numpy_matches_transformers_internvl_vision(tmp_path, rng, flavour, dtype, size):
    from transformers import InternVLVisionModel

    _, config, state = _tiny(tmp_path, flavour)
    np_dtype, torch_dtype = DTYPES[dtype]
    hf_model = InternVLVisionModel(_to_hf_config(config)).to(torch_dtype).eval()
    missing, unexpected = hf_model.load_state_dict(_to_hf(config, state), strict=False)
    assert not unexpected and not missing, (missing, unexpected)
    pixels = _pixels(rng, 2, *size, np_dtype)
    out = InternVisionModel.from_state_dict(config, state, dtype)(pixels, output_hidden_states=True)
    with torch.no_grad():
        ref = hf_model(torch.from_numpy(pixels), output_hidden_states=True)
    # tolerance: transformers scales AFTER q·kᵀ and splits qkv, so roundings differ at the 1-ulp level
    # per op; 128 ulps as above (measured ≈ 1e-14 in float64, ≈ 5e-6 in float32)
    # (scale from the transformers reference, not from the output under test)
    rtol, atol = tolerance(dtype, LAYER_ULPS, LAYER_ULPS, scale=float(ref.last_hidden_state.abs().mean()))
    assert len(ref.hidden_states) == len(out.hidden_states)
    for i, (a, r) in enumerate(zip(out.hidden_states, ref.hidden_states)):
        assert_close(a, r, rtol=rtol, atol=atol, what=f"{flavour} vs transformers hidden_states[{i}]")


@pytest.mark.parametrize("flavour", FLAVOURS)
def test_both_packages_build_the_same_tree_with_the_checkpoint_keys(tmp_path, flavour):
    """The mirror rule for InternViT: module for module, parameter for parameter, the checkpoint's keys."""
    directory, config, state = _tiny(tmp_path, flavour)
    ours, theirs = minivl.load_model(directory), torch_impl.load_model(directory)
    assert [(n, type(m).__name__) for n, m in ours.named_modules()] == \
        [(n, type(m).__name__) for n, m in theirs.named_modules()]
    assert [(k, tuple(v.shape)) for k, v in ours.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in theirs.state_dict().items()]
    assert set(ours.state_dict()) == set(state)
    for key, array in state.items():  # tolerance 0: float64 file -> float32 model, one rounding on both sides
        np.testing.assert_array_equal(ours.state_dict()[key], np.asarray(array, dtype=np.float32), err_msg=key)
        np.testing.assert_array_equal(theirs.state_dict()[key].numpy(), ours.state_dict()[key], err_msg=key)
    assert InternVisionModel.expected_shapes(config) == TorchInternVisionModel.expected_shapes(config) == \
        {key: tuple(array.shape) for key, array in state.items()}
    # the attribute paths of issue 11, in both packages
    for model in (ours, theirs):
        layer = model.encoder.layers[0]
        assert tuple(layer.attn.qkv.weight.shape) == (3 * config.hidden_size, config.hidden_size)
        assert hasattr(layer.attn, "q_norm") == hasattr(layer.attn, "k_norm") == (flavour == "6b")
        assert tuple(layer.mlp.fc1.weight.shape) == (config.intermediate_size, config.hidden_size)
        assert tuple(layer.ls1.shape) == tuple(layer.ls2.shape) == (config.hidden_size,)
        assert tuple(model.embeddings.patch_embedding.weight.shape) == (config.hidden_size, 3, 14, 14)
