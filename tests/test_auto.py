"""torch_impl.auto: transformers' AutoConfig / AutoModel / AutoModelForCausalLM on minivl's checkpoints.

Checked here, on tiny InternVL2-1B / -2B / -4B checkpoints (minivl.tiny) and on one written by
InternVL's own config code (transcribed below from InternVL's configuration_internvl_chat.py,
configuration_intern_vit.py and configuration_internlm2.py; Llama / Qwen2 from transformers, as
the reference imports them) run on the installed transformers:
* AutoConfig extracts vision_config / llm_config as the reference's InternVLChatConfig does;
* AutoModel / AutoModelForCausalLM logits equal torch_impl.load_model's: the same torch_impl model on
  the same weights, so bit for bit (torch.equal), not within a tolerance;
* save_pretrained writes a directory minivl, torch_impl and AutoModel read, whose auto_map names files
  that exist; with trust_remote_code=True a fresh process loads it through those files;
* llama / qwen2 / phi3 / mpt stay transformers' own.
"""
import copy
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, LlamaConfig, PretrainedConfig, Qwen2Config

import minivl
import torch_impl
import torch_impl.auto as auto
from minivl.config import load_config
from minivl.errors import CheckpointError, ConfigError
from minivl.tiny.internvl import write_tiny_internvl
from minivl.tiny.llm import write_tiny_llm
from minivl.tiny.vision import write_tiny_vit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# ----------------------------------------------------------------------------- InternVL's config code


class RefInternVisionConfig(PretrainedConfig):
    """configuration_intern_vit.InternVisionConfig."""

    model_type = 'intern_vit_6b'

    def __init__(self, num_channels=3, patch_size=14, image_size=224, qkv_bias=False, hidden_size=3200,
                 num_attention_heads=25, intermediate_size=12800, qk_normalization=True, num_hidden_layers=48,
                 use_flash_attn=True, hidden_act='gelu', norm_type='rms_norm', layer_norm_eps=1e-6, dropout=0.0,
                 drop_path_rate=0.0, attention_dropout=0.0, initializer_range=0.02, initializer_factor=0.1,
                 **kwargs):
        super().__init__(**kwargs)
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.dropout = dropout
        self.drop_path_rate = drop_path_rate
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_channels = num_channels
        self.patch_size = patch_size
        self.image_size = image_size
        self.initializer_range = initializer_range
        self.initializer_factor = initializer_factor
        self.attention_dropout = attention_dropout
        self.layer_norm_eps = layer_norm_eps
        self.hidden_act = hidden_act
        self.norm_type = norm_type
        self.qkv_bias = qkv_bias
        self.qk_normalization = qk_normalization
        self.use_flash_attn = use_flash_attn


class RefInternLM2Config(PretrainedConfig):
    """configuration_internlm2.InternLM2Config (its _rope_scaling_validation left out: the tiny values pass it)."""

    model_type = 'internlm2'
    _auto_class = 'AutoConfig'

    def __init__(self, vocab_size=103168, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=None, hidden_act='silu', max_position_embeddings=2048,
                 initializer_range=0.02, rms_norm_eps=1e-6, use_cache=True, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2, tie_word_embeddings=False, bias=True, rope_theta=10000, rope_scaling=None,
                 attn_implementation='eager', rope_pos_id_version='default', rope_pos_id_stride=None, **kwargs):
        self.vocab_size = vocab_size
        self.max_position_embeddings = max_position_embeddings
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.bias = bias
        if num_key_value_heads is None:
            num_key_value_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.initializer_range = initializer_range
        self.rms_norm_eps = rms_norm_eps
        self.use_cache = use_cache
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.rope_pos_id_version = rope_pos_id_version
        self.rope_pos_id_stride = rope_pos_id_stride
        self.attn_implementation = attn_implementation
        if self.attn_implementation is None:
            self.attn_implementation = 'eager'
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)


class RefInternVLChatConfig(PretrainedConfig):
    """configuration_internvl_chat.InternVLChatConfig, as InternVL2's checkpoints ship it (hidden_size and
    tie_word_embeddings=False on both configs, the lines its repository copy lacks)."""

    model_type = 'internvl_chat'
    is_composition = True

    def __init__(self, vision_config=None, llm_config=None, use_backbone_lora=0, use_llm_lora=0, pad2square=False,
                 select_layer=-1, force_image_size=None, downsample_ratio=0.5, template=None,
                 dynamic_image_size=False, use_thumbnail=False, ps_version='v1', min_dynamic_patch=1,
                 max_dynamic_patch=6, **kwargs):
        super().__init__(**kwargs)
        if vision_config is None:
            vision_config = {}
        if llm_config is None:
            llm_config = {}
        self.vision_config = RefInternVisionConfig(**vision_config)
        if llm_config['architectures'][0] == 'LlamaForCausalLM':
            self.llm_config = LlamaConfig(**llm_config)
        elif llm_config['architectures'][0] == 'InternLM2ForCausalLM':
            self.llm_config = RefInternLM2Config(**llm_config)
        elif llm_config['architectures'][0] == 'Qwen2ForCausalLM':
            self.llm_config = Qwen2Config(**llm_config)
        else:
            raise ValueError('Unsupported architecture: {}'.format(llm_config['architectures'][0]))
        self.use_backbone_lora = use_backbone_lora
        self.use_llm_lora = use_llm_lora
        self.pad2square = pad2square
        self.select_layer = select_layer
        self.force_image_size = force_image_size
        self.downsample_ratio = downsample_ratio
        self.template = template
        self.dynamic_image_size = dynamic_image_size
        self.use_thumbnail = use_thumbnail
        self.ps_version = ps_version
        self.min_dynamic_patch = min_dynamic_patch
        self.max_dynamic_patch = max_dynamic_patch
        self.hidden_size = self.llm_config.hidden_size
        self.tie_word_embeddings = False
        self.llm_config.tie_word_embeddings = self.tie_word_embeddings

    def to_dict(self):
        output = copy.deepcopy(self.__dict__)
        output['vision_config'] = self.vision_config.to_dict()
        output['llm_config'] = self.llm_config.to_dict()
        output['model_type'] = self.__class__.model_type
        for key in ('use_backbone_lora', 'use_llm_lora', 'pad2square', 'select_layer', 'force_image_size',
                    'downsample_ratio', 'template', 'dynamic_image_size', 'use_thumbnail', 'ps_version',
                    'min_dynamic_patch', 'max_dynamic_patch'):
            output[key] = getattr(self, key)
        return output


# ----------------------------------------------------------------------------- fixtures and helpers

COMBOS = ["internlm2", "qwen2", "phi3"]   # InternVL2-2B, -1B, -4B


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("auto")
    return {llm: write_tiny_internvl(root / llm, llm=llm, dtype="float64", seed=11) for llm in COMBOS}


def chat_inputs(config, n_tiles=2, seed=0):
    """pixel_values [n_tiles, 3, s, s] and a prompt with the <IMG_CONTEXT> run they fill, as torch tensors."""
    from minivl.conversation import IMG_CONTEXT_TOKEN

    rng = np.random.default_rng(seed)
    size = config.force_image_size or config.vision_config.image_size
    pixel_values = torch.from_numpy(rng.standard_normal((n_tiles, 3, size, size)))
    return pixel_values, n_tiles * config.num_image_token, IMG_CONTEXT_TOKEN


def logits_of(model, directory, dtype=torch.float64):
    """Logits of a fixed image prompt: text ids around one tile-run of <IMG_CONTEXT>."""
    from minivl.tokenizer import load_tokenizer

    config = load_config(directory)
    tokenizer = load_tokenizer(directory)
    pixel_values, n_context, context = chat_inputs(config)
    ids = tokenizer.encode("Look: <img>" + context * n_context + "</img> what is it?", add_special_tokens=True)
    model.img_context_token_id = tokenizer.token_to_id(context)
    with torch.no_grad():
        return model(pixel_values=pixel_values.to(dtype), input_ids=torch.tensor([ids])).logits


def reference_written(source, directory):
    """A checkpoint whose config.json InternVL's own config code wrote (save_pretrained), same weights."""
    config_dict = json.loads(open(os.path.join(source, "config.json"), encoding="utf-8").read())
    RefInternVLChatConfig(**config_dict).save_pretrained(directory)
    shutil.copy(os.path.join(source, "model.safetensors"), directory)
    for name in os.listdir(source):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(source, name), directory)
    return os.fspath(directory)


# ----------------------------------------------------------------------------- AutoConfig

@pytest.mark.parametrize("llm", COMBOS)
def test_auto_config_nests_the_configs_as_the_reference(checkpoints, llm):
    path = checkpoints[llm]
    config = AutoConfig.from_pretrained(path)
    assert type(config) is auto.InternVLChatConfig and isinstance(config, PretrainedConfig)
    assert type(config.vision_config) is auto.InternVisionConfig
    assert type(config.llm_config) is auto.LLM_CONFIGS[config.llm_config.architectures[0]]
    assert config.llm_config.model_type == llm
    assert config.hidden_size == config.llm_config.hidden_size
    assert config.tie_word_embeddings is False and config.llm_config.tie_word_embeddings is False
    # the minivl config it stands for, and its config.json dict, are the directory's
    assert config.to_dict() == load_config(path).to_dict()
    if llm == "phi3":
        return   # the reference nests InternVL's vendored Phi3Config, not transcribed here
    reference = RefInternVLChatConfig(**json.loads(open(f"{path}/config.json").read()))
    assert reference.llm_config.model_type == config.llm_config.model_type
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
                 "intermediate_size", "vocab_size", "rms_norm_eps", "max_position_embeddings", "bos_token_id",
                 "eos_token_id", "tie_word_embeddings"):
        assert getattr(config.llm_config, name) == getattr(reference.llm_config, name), name
    for name in ("hidden_size", "num_hidden_layers", "num_attention_heads", "image_size", "patch_size",
                 "qk_normalization", "qkv_bias", "norm_type", "layer_norm_eps", "initializer_factor"):
        assert getattr(config.vision_config, name) == getattr(reference.vision_config, name), name
    for name in ("select_layer", "downsample_ratio", "ps_version", "template", "force_image_size", "hidden_size",
                 "tie_word_embeddings", "dynamic_image_size", "max_dynamic_patch", "use_thumbnail"):
        assert getattr(config, name) == getattr(reference, name), name


def test_vision_config_from_a_chat_checkpoint_and_bad_values(checkpoints, tmp_path):
    vision = auto.InternVisionConfig.from_pretrained(checkpoints["internlm2"])   # the nested one, as the reference
    assert vision.to_dict() == load_config(checkpoints["internlm2"]).vision_config.to_dict()
    bad = tmp_path / "bad"
    shutil.copytree(checkpoints["qwen2"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["ps_version"] = "v3"
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="ps_version must be one of"):
        AutoConfig.from_pretrained(bad)


# ----------------------------------------------------------------------------- AutoModel

@pytest.mark.parametrize("llm", COMBOS)
@pytest.mark.parametrize("auto_class", [AutoModel, AutoModelForCausalLM])
def test_auto_model_logits_equal_load_model(checkpoints, llm, auto_class):
    path = checkpoints[llm]
    model = auto_class.from_pretrained(path, dtype=torch.float64)
    expected = torch_impl.load_model(path, dtype="float64")
    assert isinstance(model, auto.InternVLChatModel) and isinstance(model, type(expected))
    assert sorted(model.state_dict()) == sorted(expected.state_dict())
    assert torch.equal(logits_of(model, path), logits_of(expected, path))


def test_dtype_and_attention_choices_reach_torch_impl(checkpoints):
    path = checkpoints["qwen2"]
    model = AutoModel.from_pretrained(path, dtype="auto", attn_implementation="sdpa")  # auto: the stored float64
    expected = torch_impl.load_model(path, dtype="float64", attn_implementation="sdpa")
    assert torch.equal(logits_of(model, path), logits_of(expected, path))
    model32 = AutoModel.from_pretrained(path)                                          # default: float32
    assert next(model32.parameters()).dtype == torch.float32
    assert torch.equal(logits_of(model32, path, torch.float32),
                       logits_of(torch_impl.load_model(path), path, torch.float32))


def test_standalone_internlm2_and_intern_vit(tmp_path):
    llm = write_tiny_llm(tmp_path / "internlm2", "internlm2", dtype="float64")
    config = AutoConfig.from_pretrained(llm)
    assert type(config) is auto.InternLM2Config and config.rope_scaling == {"type": "dynamic", "factor": 2.0}
    model = AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float64)
    assert isinstance(model, auto.InternLM2ForCausalLM)
    ids = torch.tensor([[1, 17, 42, 99, 7]])
    assert torch.equal(model(input_ids=ids).logits, torch_impl.load_model(llm, "float64")(input_ids=ids).logits)
    vit = write_tiny_vit(tmp_path / "vit", dtype="float64")
    model = AutoModel.from_pretrained(vit, dtype=torch.float64)
    assert isinstance(model, auto.InternVisionModel)
    pixels = torch.from_numpy(np.random.default_rng(1).standard_normal((2, 3, 56, 56)))
    assert torch.equal(model(pixels).last_hidden_state, torch_impl.load_model(vit, "float64")(pixels).last_hidden_state)


def test_model_types_transformers_owns_stay_its_own(tmp_path):
    for family, config_class in (("qwen2", Qwen2Config), ("llama", LlamaConfig)):
        path = write_tiny_llm(tmp_path / family, family)
        assert type(AutoConfig.from_pretrained(path)) is config_class
        assert type(AutoModelForCausalLM.from_pretrained(path)).__module__.startswith("transformers.")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    for model_type in ("llama", "qwen2", "phi3", "mpt"):
        assert CONFIG_MAPPING[model_type].__module__.startswith("transformers."), model_type


def test_from_pretrained_errors(checkpoints, tmp_path):
    path = checkpoints["qwen2"]
    with pytest.raises(CheckpointError, match="not a local checkpoint directory; minivl never downloads"):
        auto.InternVLChatModel.from_pretrained(str(tmp_path / "OpenGVLab-InternVL2-1B"))
    changed = AutoConfig.from_pretrained(path, select_layer=-2)
    with pytest.raises(ConfigError, match="config passed differs"):
        AutoModel.from_pretrained(path, config=changed)
    with pytest.raises(ConfigError, match="device_map='auto'.*one device"):
        AutoModel.from_pretrained(path, device_map="auto")
    with pytest.raises(ConfigError, match=r"do not support \['quantization_config'\]"):
        auto.InternVLChatModel.from_pretrained(path, quantization_config={"bits": 4})
    with pytest.raises(CheckpointError, match="model_type is 'internvl_chat', not 'internlm2' as InternLM2ForCausalLM"):
        auto.InternLM2ForCausalLM.from_pretrained(path)


# ----------------------------------------------------------------------------- written by InternVL's code

def test_checkpoint_written_by_internvl_config_code_internlm2(checkpoints, tmp_path):
    """InternVL2-2B's layout: InternVL's own config classes (InternLM2Config among them) save the config.

    Without rope_scaling: on transformers 5, InternLM2Config's `self.rope_scaling = ...` goes through
    PretrainedConfig's rope_scaling property into `rope_parameters`, which the next test covers.
    """
    source = checkpoints["internlm2"]
    config_dict = json.loads(open(f"{source}/config.json").read())
    config_dict["llm_config"]["rope_scaling"] = None
    scratch = tmp_path / "source"
    shutil.copytree(source, scratch)
    (scratch / "config.json").write_text(json.dumps(config_dict))
    path = reference_written(scratch, tmp_path / "by_internvl")
    written = json.loads(open(f"{path}/config.json").read())
    assert written["llm_config"]["model_type"] == "internlm2" and "vision_config" in written
    config = AutoConfig.from_pretrained(path)
    assert type(config.llm_config) is auto.InternLM2Config and config.hidden_size == config.llm_config.hidden_size
    model = AutoModel.from_pretrained(path, dtype=torch.float64)
    logits = logits_of(model, path)
    assert torch.equal(logits, logits_of(torch_impl.load_model(path, "float64"), path))
    # and it is the model minivl wrote in the first place (a short prompt: dynamic NTK does not act yet)
    assert torch.equal(logits, logits_of(torch_impl.load_model(source, "float64"), source))


def test_internlm2_rope_scaling_written_by_transformers_5_is_a_named_error(checkpoints, tmp_path):
    """InternVL's InternLM2Config on transformers 5 writes rope_scaling only inside rope_parameters; minivl's
    InternLM2Config (the 4.x layout) says so by name rather than run without the dynamic NTK scaling."""
    path = reference_written(checkpoints["internlm2"], tmp_path / "by_internvl")
    llm_config = json.loads(open(f"{path}/config.json").read())["llm_config"]
    assert "rope_scaling" not in llm_config and llm_config["rope_parameters"]["rope_type"] == "dynamic"
    with pytest.raises(ConfigError, match="rope_parameters .* is not read for internlm2"):
        AutoConfig.from_pretrained(path)
    with pytest.raises(ConfigError, match="rope_parameters .* is not read for internlm2"):
        torch_impl.load_model(path)


def test_checkpoint_written_by_internvl_config_code_qwen2(checkpoints, tmp_path):
    """InternVL2-1B's layout, its llm_config written by the installed transformers' Qwen2Config: rope_theta
    only inside rope_parameters, which minivl's Qwen2Config reads."""
    source = checkpoints["qwen2"]
    path = reference_written(source, tmp_path / "by_internvl")
    assert "rope_theta" not in json.loads(open(f"{path}/config.json").read())["llm_config"]
    model = AutoModel.from_pretrained(path, dtype=torch.float64)
    logits = logits_of(model, path)
    assert torch.equal(logits, logits_of(torch_impl.load_model(path, "float64"), path))
    assert torch.equal(logits, logits_of(torch_impl.load_model(source, "float64"), source))


# ----------------------------------------------------------------------------- save_pretrained

@pytest.mark.parametrize("llm", ["internlm2", "qwen2"])
def test_save_pretrained_round_trip(checkpoints, tmp_path, llm):
    source = checkpoints[llm]
    model = AutoModel.from_pretrained(source, dtype=torch.float64)
    out = model.save_pretrained(tmp_path / "saved")
    for name in os.listdir(source):
        if name.startswith("tokenizer"):
            shutil.copy(os.path.join(source, name), out)
    saved = json.loads(open(f"{out}/config.json").read())
    original = json.loads(open(f"{source}/config.json").read())
    assert saved == original                      # float64 in, float64 out: every key as it was
    expected = logits_of(torch_impl.load_model(source, "float64"), source)
    assert torch.equal(logits_of(torch_impl.load_model(out, "float64"), out), expected)
    assert torch.equal(logits_of(AutoModel.from_pretrained(out, dtype=torch.float64), out), expected)
    assert minivl.load_model(out, "float64").config.to_dict() == load_config(source).to_dict()
    # every file an auto_map names exists and imports the adapter's class of that name
    for section in (saved, saved["llm_config"], saved["vision_config"]):
        for reference in (section.get("auto_map") or {}).values():
            module, name = reference.rsplit(".", 1)
            source_text = open(f"{out}/{module}.py").read()
            assert f"from torch_impl.auto import" in source_text and name in source_text
            assert hasattr(auto, name)


def test_bfloat16_save_records_the_dtype_and_config_save_pretrained(checkpoints, tmp_path):
    source = checkpoints["qwen2"]
    out = AutoModel.from_pretrained(source, dtype=torch.bfloat16).save_pretrained(tmp_path / "bf16")
    assert json.loads(open(f"{out}/config.json").read())["torch_dtype"] == "bfloat16"
    assert next(torch_impl.load_model(out, "bfloat16").parameters()).dtype == torch.bfloat16
    config = AutoConfig.from_pretrained(source)
    config.save_pretrained(tmp_path / "config_only")
    assert json.loads((tmp_path / "config_only" / "config.json").read_text()) == \
        json.loads(open(f"{source}/config.json").read())
    assert (tmp_path / "config_only" / "configuration_internvl_chat.py").is_file()


def test_release_code_files_are_left_alone(checkpoints, tmp_path):
    from minivl.auto_map import write_auto_map_modules

    path = tmp_path / "release"
    shutil.copytree(checkpoints["internlm2"], path)
    (path / "modeling_internvl_chat.py").write_text("# InternVL's own modeling code\n")
    written = write_auto_map_modules(path)
    assert (path / "modeling_internvl_chat.py").read_text() == "# InternVL's own modeling code\n"
    assert str(path / "modeling_internvl_chat.py") not in written


# ----------------------------------------------------------------------------- trust_remote_code

FRESH_PROCESS = """
import sys, torch
from transformers import AutoConfig, AutoModel
path = sys.argv[1]
assert "torch_impl.auto" not in sys.modules
try:
    AutoConfig.from_pretrained(path)
except ValueError as e:
    print("without:", "trust_remote_code" in str(e))
config = AutoConfig.from_pretrained(path, trust_remote_code=True)
model = AutoModel.from_pretrained(path, trust_remote_code=True, dtype=torch.float64)
print("config:", type(config).__module__, type(config).__name__)
import torch_impl.auto
print("model:", isinstance(model, torch_impl.auto.InternVLChatModel), type(model).__name__)
torch.save(model.state_dict(), sys.argv[2])
"""


def test_trust_remote_code_loads_through_the_written_files(checkpoints, tmp_path):
    """A process that never imported torch_impl.auto: the auto_map's files (one import each) bring it in."""
    path = checkpoints["internlm2"]
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result = subprocess.run([sys.executable, "-c", FRESH_PROCESS, path, str(tmp_path / "state.pt")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "without: True" in result.stdout                 # remote code is never run unasked
    assert "config: torch_impl.auto InternVLChatConfig" in result.stdout
    assert "model: True InternVLChatModel" in result.stdout
    state = torch.load(tmp_path / "state.pt")
    expected = torch_impl.load_model(path, "float64").state_dict()
    assert sorted(state) == sorted(expected) and all(torch.equal(state[k], expected[k]) for k in expected)
