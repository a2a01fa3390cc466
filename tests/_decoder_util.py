"""Helpers shared by the decoder tests (test_models_*, test_generate, test_loading, test_parity_cli).

Tolerance convention for NumPy-vs-torch parity of a whole model: |a − r| <= atol + rtol·|r| with
rtol = ULPS·eps(dtype) and atol = ULPS·eps(dtype)·max|r| (the tensor's own scale). The two packages
run the same ops in the same order, so the only differences are the summation orders of the matmuls
(NumPy's BLAS vs torch's kernels) and the last-ulp behaviour of exp/cos/sin/erf; these add a few
ulps of the largest value per op and grow slowly with depth. ULPS is set to ~4x the largest error
measured on these tiny models (see each test), so a wrong op order (1e-3 relative) or a wrong
layout fails by orders of magnitude.
"""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from minivl.testing import assert_close, tolerance
from minivl.tiny.llm import FAMILIES  # noqa: F401  (the tests' family list is the tiny checkpoints')

DTYPES = ("float32", "float64")

# Measured worst NumPy-vs-torch error on the tiny checkpoints (any layer, any family), in ulps of the
# tensor's max |value|: 14.6 (float32, Phi-3) and 7.4 (float64); 64 leaves a 4x margin and sits
# orders of magnitude below what a wrong op order (~1e-3 relative) or a wrong layout produces.
MODEL_ULPS = 64


def to_np(x) -> np.ndarray:
    if hasattr(x, "detach"):
        return x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64)


def assert_parity(actual, reference, dtype, ulps: float = MODEL_ULPS, what: str = ""):
    """|a − r| <= ulps·eps·(max|r| + |r|): the tolerance described in the module docstring."""
    reference_np = to_np(reference)
    scale = float(np.abs(reference_np).max()) if reference_np.size else 1.0
    rtol, atol = tolerance(dtype, ulps, ulps, scale=scale)
    return assert_close(to_np(actual), reference_np, rtol=rtol, atol=atol, what=what)


def ulps_of(actual, reference, dtype) -> float:
    """The error measured in ulps of the reference's max |value| (what the tolerances are set from)."""
    from minivl.testing import eps

    a, r = to_np(actual), to_np(reference)
    return float(np.abs(a - r).max() / (eps(dtype) * max(np.abs(r).max(), 1e-300)))


def hf_copy(path, out, edit) -> str:
    """Copy a checkpoint directory and rewrite its config.json with `edit(config_dict)` (for transformers)."""
    shutil.copytree(path, out, dirs_exist_ok=True)
    config_path = os.path.join(out, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    edit(config)
    with open(config_path, "w") as f:
        json.dump(config, f)
    return os.fspath(out)


def internlm2_as_llama(path, out) -> str:
    """Rewrite a tiny InternLM2 checkpoint as a Llama one (the spec's wqkv -> q/k/v recipe), for transformers.

    wqkv [(H+2K)·D, hidden] viewed as [K, G+2, D, hidden]: q = [:, :G], k = [:, G], v = [:, G+1].
    Written independently of minivl.models.internlm2.split_wqkv so that a layout bug cannot cancel out.
    """
    from minivl.checkpoint import load_state_dict, write_safetensors

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    state = load_state_dict(path)
    H, K = config["num_attention_heads"], config["num_key_value_heads"]
    hidden = config["hidden_size"]
    D, G = hidden // H, H // K
    tensors = {"model.embed_tokens.weight": state["model.tok_embeddings.weight"],
               "model.norm.weight": state["model.norm.weight"], "lm_head.weight": state["output.weight"]}
    for i in range(config["num_hidden_layers"]):
        src, dst = f"model.layers.{i}.", f"model.layers.{i}."
        wqkv = np.asarray(state[src + "attention.wqkv.weight"])
        rows_q, rows_k, rows_v = [], [], []
        for kv in range(K):
            block = kv * (G + 2) * D
            for j in range(G):
                rows_q.append(wqkv[block + j * D: block + (j + 1) * D])
            rows_k.append(wqkv[block + G * D: block + (G + 1) * D])
            rows_v.append(wqkv[block + (G + 1) * D: block + (G + 2) * D])
        tensors[dst + "self_attn.q_proj.weight"] = np.concatenate(rows_q)
        tensors[dst + "self_attn.k_proj.weight"] = np.concatenate(rows_k)
        tensors[dst + "self_attn.v_proj.weight"] = np.concatenate(rows_v)
        tensors[dst + "self_attn.o_proj.weight"] = state[src + "attention.wo.weight"]
        tensors[dst + "mlp.gate_proj.weight"] = state[src + "feed_forward.w1.weight"]
        tensors[dst + "mlp.up_proj.weight"] = state[src + "feed_forward.w3.weight"]
        tensors[dst + "mlp.down_proj.weight"] = state[src + "feed_forward.w2.weight"]
        tensors[dst + "input_layernorm.weight"] = state[src + "attention_norm.weight"]
        tensors[dst + "post_attention_layernorm.weight"] = state[src + "ffn_norm.weight"]
    os.makedirs(out, exist_ok=True)
    write_safetensors(os.path.join(out, "model.safetensors"), {k: np.ascontiguousarray(v) for k, v in tensors.items()},
                      metadata={"format": "pt"})
    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
             "intermediate_size": config["intermediate_size"], "num_hidden_layers": config["num_hidden_layers"],
             "num_attention_heads": H, "num_key_value_heads": K, "vocab_size": config["vocab_size"],
             "max_position_embeddings": config["max_position_embeddings"], "rms_norm_eps": config["rms_norm_eps"],
             "rope_theta": config["rope_theta"], "tie_word_embeddings": False, "attention_bias": False,
             "hidden_act": "silu"}
    if config.get("rope_scaling"):
        llama["rope_scaling"] = {"rope_type": config["rope_scaling"]["type"], "factor": config["rope_scaling"]["factor"]}
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(llama, f)
    return os.fspath(out)


def left_padded_batch(rng, lengths, vocab: int, low: int = 3):
    """Random prompts of the given lengths, left-padded with id 0: -> (ids [b, max], mask [b, max], rows)."""
    width = max(lengths)
    ids = np.zeros((len(lengths), width), dtype=np.int64)
    mask = np.zeros((len(lengths), width), dtype=np.int64)
    rows = []
    for i, n in enumerate(lengths):
        row = rng.integers(low, vocab, n)
        ids[i, width - n:] = row
        mask[i, width - n:] = 1
        rows.append(row)
    return ids, mask, rows


def internvl_like_checkpoint(directory, llm_path):
    """An InternVL-style directory: internvl_chat config with llm_config, LLM tensors under language_model.,
    plus vision/projector tensors that an LLM-only load must ignore."""
    from minivl.checkpoint import load_state_dict, save_checkpoint

    with open(os.path.join(llm_path, "config.json")) as f:
        llm_config = json.load(f)
    config = {"model_type": "internvl_chat", "architectures": ["InternVLChatModel"], "llm_config": llm_config,
              "vision_config": {"model_type": "intern_vit_6b", "hidden_size": 32, "num_attention_heads": 2,
                                "intermediate_size": 64, "num_hidden_layers": 1, "image_size": 56},
              "template": "Hermes-2", "ps_version": "v2", "downsample_ratio": 0.5, "force_image_size": 56}
    tensors = {f"language_model.{k}": np.asarray(v) for k, v in load_state_dict(llm_path).items()}
    tensors["vision_model.embeddings.class_embedding"] = np.zeros((1, 1, 32), np.float32)
    tensors["mlp1.0.weight"] = np.ones(128, np.float32)
    save_checkpoint(directory, config, tensors)
    return os.fspath(directory)
