"""minivl.config: the released configs load with the right derived numbers, round-trip without
losing a key, and every config the reference would reject raises ConfigError naming the problem."""
import copy
import json
import os

import pytest

from minivl.config import (ConfigError, InternLM2Config, InternVisionConfig, InternVLChatConfig, LlamaConfig,
                           MPTConfig, Phi3Config, Qwen2Config, load_config)
from minivl.errors import ConfigError as ErrorsConfigError

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "configs")

# name -> (LLM class, head_dim, GQA group size G = H/K, ViT head_dim, rope_type); numbers from spec 8.3/8.4
RELEASED = {
    "InternVL2-1B": (Qwen2Config, 64, 7, 64, "default"),
    "InternVL2-2B": (InternLM2Config, 128, 2, 64, "dynamic"),
    "InternVL2-4B": (Phi3Config, 96, 1, 64, "su"),
    "InternVL2-8B": (InternLM2Config, 128, 4, 64, "dynamic"),
    "InternVL2_5-2B": (InternLM2Config, 128, 2, 64, "dynamic"),
}


def fixture_path(name):
    return os.path.join(FIXTURES, f"{name}.json")


def fixture_dict(name):
    with open(fixture_path(name)) as f:
        return json.load(f)


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_loads_with_derived_numbers(name):
    llm_class, head_dim, groups, vit_head_dim, rope_type = RELEASED[name]
    config = load_config(fixture_path(name))
    assert type(config) is InternVLChatConfig
    assert type(config.llm_config) is llm_class
    assert type(config.vision_config) is InternVisionConfig
    assert config.llm_config.head_dim == head_dim
    assert config.llm_config.num_key_value_groups == groups
    assert config.vision_config.head_dim == vit_head_dim
    # 448px tile / 14px patch = 32x32 patches, pixel shuffle 0.5 -> 16x16 = 256 tokens
    assert config.num_image_token == 256
    assert config.hidden_size == config.llm_config.hidden_size
    kwargs = config.llm_config.rope_kwargs()
    assert kwargs["rope_type"] == rope_type
    assert kwargs["head_dim"] == head_dim
    assert kwargs["rope_theta"] == fixture_dict(name)["llm_config"]["rope_theta"]


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_released_config_round_trips_every_key(name, tmp_path):
    original = fixture_dict(name)
    config = load_config(fixture_path(name))
    written = config.to_dict()

    def assert_contains(written, original, where):
        # every key of the file comes back with its value (nested configs recursively)
        for key, value in original.items():
            assert key in written, f"{where}{key} lost in the round trip"
            if isinstance(value, dict) and key in ("vision_config", "llm_config"):
                assert_contains(written[key], value, f"{where}{key}.")
            else:
                assert written[key] == value, f"{where}{key}: {written[key]!r} != {value!r}"

    assert_contains(written, original, "")
    config.save_pretrained(tmp_path)
    again = InternVLChatConfig.from_pretrained(tmp_path)
    assert again == config
    assert again.to_dict() == written


def test_released_values_reach_the_fields():
    config = load_config(fixture_path("InternVL2-8B"))
    llm = config.llm_config
    assert (llm.hidden_size, llm.intermediate_size, llm.num_hidden_layers) == (4096, 14336, 32)
    assert (llm.num_attention_heads, llm.num_key_value_heads, llm.vocab_size) == (32, 8, 92553)
    assert (llm.bias, llm.rms_norm_eps, llm.rope_theta) == (False, 1e-5, 1000000)
    assert llm.rope_kwargs() == dict(rope_type="dynamic", head_dim=128, rope_theta=1000000,
                                     max_position_embeddings=32768, factor=2.0)
    assert llm.extra["_name_or_path"] == "internlm/internlm2_5-7b-chat"
    vision = config.vision_config
    assert (vision.hidden_size, vision.num_hidden_layers, vision.norm_type, vision.qkv_bias) == \
        (1024, 24, "layer_norm", True)
    assert config.template == "internlm2-chat" and config.ps_version == "v2"


def test_phi3_su_rope_kwargs_carry_both_factor_lists():
    config = load_config(fixture_path("InternVL2-4B")).llm_config
    scaling = fixture_dict("InternVL2-4B")["llm_config"]["rope_scaling"]
    kwargs = config.rope_kwargs()
    assert kwargs["rope_type"] == "su"
    assert kwargs["short_factor"] == scaling["short_factor"] and len(kwargs["short_factor"]) == 48
    assert kwargs["long_factor"] == scaling["long_factor"]
    assert kwargs["original_max_position_embeddings"] == 4096
    assert kwargs["max_position_embeddings"] == 131072
    yarn = Phi3Config(hidden_size=64, num_attention_heads=4,
                      rope_scaling={"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})
    assert yarn.rope_kwargs()["rope_type"] == "phi3_yarn"


def test_vision_config_from_a_chat_checkpoint(tmp_path):
    # the reference's InternVisionConfig.from_pretrained extracts the nested vision_config
    (tmp_path / "config.json").write_text(json.dumps(fixture_dict("InternVL2-2B")))
    vision = InternVisionConfig.from_pretrained(tmp_path)
    assert vision == load_config(fixture_path("InternVL2-2B")).vision_config


def test_tie_word_embeddings_forced_false():
    raw = fixture_dict("InternVL2-1B")
    raw["tie_word_embeddings"] = True
    raw["llm_config"]["tie_word_embeddings"] = True   # Qwen2-0.5B was tied upstream
    config = InternVLChatConfig.from_dict(raw)
    assert config.tie_word_embeddings is False and config.llm_config.tie_word_embeddings is False
    # on its own, a Qwen2 config keeps its own tie flag
    assert Qwen2Config.from_dict(raw["llm_config"]).tie_word_embeddings is True


def test_defaults_follow_the_reference_classes():
    internlm2 = InternLM2Config()
    assert (internlm2.vocab_size, internlm2.bias, internlm2.rms_norm_eps, internlm2.rope_theta) == \
        (103168, True, 1e-6, 10000)
    assert internlm2.num_key_value_heads == 32 and internlm2.attn_implementation == "eager"
    assert InternLM2Config(attn_implementation=None).attn_implementation == "eager"
    phi3 = Phi3Config()
    assert (phi3.vocab_size, phi3.hidden_size, phi3.rms_norm_eps, phi3.eos_token_id) == (32064, 3072, 1e-5, 32000)
    qwen2 = Qwen2Config()
    assert (qwen2.vocab_size, qwen2.num_key_value_heads, qwen2.max_position_embeddings) == (151936, 32, 32768)
    llama = LlamaConfig()
    assert (llama.vocab_size, llama.rms_norm_eps, llama.pad_token_id) == (32000, 1e-6, None)
    vision = InternVisionConfig()
    assert (vision.hidden_size, vision.num_hidden_layers, vision.norm_type, vision.image_size) == \
        (3200, 48, "rms_norm", 224)
    mpt = MPTConfig()
    assert mpt.attn_config["attn_impl"] == "triton" and mpt.init_config["name"] == "kaiming_normal_"
    assert mpt.head_dim == 128 and mpt.num_key_value_heads == 16 and mpt.rope_kwargs() is None


def test_mpt_fills_missing_sub_keys_and_keeps_unknown_ones():
    mpt = MPTConfig.from_dict({"model_type": "mpt", "d_model": 64, "n_heads": 4, "name": "dropped",
                               "attn_config": {"alibi": True, "attn_impl": "torch", "my_key": 1},
                               "learned_pos_emb": False, "custom": [1, 2]})
    assert mpt.attn_config["alibi_bias_max"] == 8 and mpt.attn_config["my_key"] == 1
    assert mpt.extra == {"custom": [1, 2]}   # 'name' is dropped, as the reference drops it
    assert MPTConfig.from_dict(mpt.to_dict()) == mpt
    mqa = MPTConfig(attn_config={"attn_type": "multiquery_attention"})
    assert mqa.num_key_value_heads == 1


def test_llama_accepts_legacy_and_newer_rope_scaling():
    legacy = LlamaConfig(rope_scaling={"type": "linear", "factor": 2.0})
    assert legacy.rope_kwargs() == dict(rope_type="linear", head_dim=128, rope_theta=10000.0,
                                        max_position_embeddings=2048, factor=2.0)
    llama3 = LlamaConfig(hidden_size=4096, num_attention_heads=32, num_key_value_heads=8,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert llama3.rope_kwargs() == dict(rope_type="llama3", head_dim=128, rope_theta=500000.0,
                                        max_position_embeddings=131072, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192)
    yarn = LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4, "beta_fast": 32})
    assert yarn.rope_kwargs()["factor"] == 4 and yarn.rope_kwargs()["beta_fast"] == 32


def test_qwen2_rope_scaling_is_accepted_and_honoured():
    qwen2 = Qwen2Config(rope_scaling={"type": "dynamic", "factor": 2.0})
    assert qwen2.rope_kwargs()["rope_type"] == "dynamic" and qwen2.rope_kwargs()["factor"] == 2.0
    assert Qwen2Config().rope_kwargs()["rope_type"] == "default"


def test_rope_init_accepts_every_rope_kwargs():
    # the contract with minivl.rope: rope_kwargs() feeds rope_init unchanged, for every scaling kind
    from minivl.rope import rope_init
    configs = [load_config(fixture_path(name)).llm_config for name in sorted(RELEASED)]
    configs += [LlamaConfig(rope_scaling={"type": "dynamic", "factor": 2.0}),
                LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 512}),
                LlamaConfig(max_position_embeddings=131072,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
                Phi3Config(hidden_size=64, num_attention_heads=4, max_position_embeddings=8192,
                           rope_scaling={"type": "yarn", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8})]
    for config in configs:
        inv_freq, attention_scaling = rope_init(**config.rope_kwargs())
        assert inv_freq.shape == (config.head_dim // 2,), type(config).__name__
        assert attention_scaling >= 1.0


def test_configs_written_by_transformers_5_load():
    # independent reference: the installed transformers (5.x) writes rope_theta inside 'rope_parameters'
    transformers = pytest.importorskip("transformers")
    hf = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=65536, rope_theta=500000.0,
                                  rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    config = load_config(hf.to_dict())
    assert type(config) is LlamaConfig and config.rope_theta == 500000.0
    assert config.rope_kwargs() == dict(rope_type="llama3", head_dim=16, rope_theta=500000.0,
                                        max_position_embeddings=65536, factor=8.0, low_freq_factor=1.0,
                                        high_freq_factor=4.0, original_max_position_embeddings=8192)
    assert load_config(config.to_dict()) == config
    qwen2 = load_config(transformers.Qwen2Config(hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                                 rope_theta=1e6).to_dict())
    assert qwen2.rope_theta == 1e6 and qwen2.rope_scaling is None and qwen2.rope_kwargs()["rope_type"] == "default"


def test_unknown_keys_survive_a_file_round_trip(tmp_path):
    config = InternLM2Config.from_dict({"model_type": "internlm2", "hidden_size": 64, "num_attention_heads": 4,
                                        "my_setting": {"a": [1, 2]}})
    path = config.save_pretrained(tmp_path)
    assert json.load(open(path))["my_setting"] == {"a": [1, 2]}
    assert load_config(tmp_path).extra == {"my_setting": {"a": [1, 2]}}


def test_torch_impl_shares_the_classes():
    import torch_impl.config
    assert torch_impl.config.InternVLChatConfig is InternVLChatConfig
    assert torch_impl.config.load_config is load_config
    assert ConfigError is ErrorsConfigError


# ----------------------------------------------------------------------------------------------
# wrong configs: each raises ConfigError whose message names the field and the fix
# ----------------------------------------------------------------------------------------------

def phi3_scaling(**overrides):
    # head_dim 16 -> 8 frequency pairs
    scaling = {"type": "su", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}
    scaling.update(overrides)
    return dict(hidden_size=64, num_attention_heads=4, rope_scaling=scaling)


WRONG = [
    ("internlm2 int factor", InternLM2Config, dict(rope_scaling={"type": "dynamic", "factor": 2}),
     "rope_scaling.factor must be a float >= 1.0 (got 2 of type int); write 2.0"),
    ("internlm2 factor < 1", InternLM2Config, dict(rope_scaling={"type": "linear", "factor": 0.5}),
     "rope_scaling.factor must be a float >= 1.0 (got 0.5"),
    ("internlm2 unknown type", InternLM2Config, dict(rope_scaling={"type": "yarn", "factor": 2.0}),
     "rope_scaling.type must be one of ['linear', 'dynamic'] (got 'yarn'"),
    ("internlm2 three keys", InternLM2Config,
     dict(rope_scaling={"type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 4096}),
     "rope_scaling must be None or a dict with exactly two keys"),
    ("phi3 longrope", Phi3Config, phi3_scaling(type="longrope"), "write \"type\": \"su\""),
    ("phi3 short list", Phi3Config, phi3_scaling(short_factor=[1.0] * 7),
     "rope_scaling.short_factor must be a list of length head_dim // 2 = 8 (got length 7)"),
    ("phi3 non-number", Phi3Config, phi3_scaling(long_factor=[1.0] * 7 + ["x"]),
     "rope_scaling.long_factor must be a list of 8 numbers"),
    ("phi3 extra key", Phi3Config, phi3_scaling(factor=32.0),
     "exactly three keys, type, short_factor and long_factor"),
    ("llama factor 1.0", LlamaConfig, dict(rope_scaling={"type": "linear", "factor": 1.0}),
     "rope_scaling.factor must be a float > 1.0 (got 1.0"),
    ("llama int factor", LlamaConfig, dict(rope_scaling={"type": "dynamic", "factor": 4}), "write 4.0"),
    ("llama unknown type", LlamaConfig, dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}),
     "rope_scaling.rope_type must be one of ['default', 'dynamic', 'linear', 'llama3', 'longrope', 'yarn']"),
    ("llama3 missing key", LlamaConfig, dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}),
     "missing ['high_freq_factor', 'low_freq_factor', 'original_max_position_embeddings']"),
    ("llama rope_parameters disagree", LlamaConfig,
     dict(rope_theta=1e6, extra={"rope_parameters": {"rope_type": "default", "rope_theta": 5e5}}),
     "rope_theta (1000000.0) disagrees with rope_parameters.rope_theta (500000.0)"),
    ("llama head_dim", LlamaConfig, dict(extra={"head_dim": 64}),
     "head_dim must equal hidden_size // num_attention_heads = 128 (got 64)"),
    ("phi3 transformers-5 rope_parameters", Phi3Config,
     dict(extra={"rope_parameters": {"rope_type": "longrope", "rope_theta": 10000.0}}),
     "is not read for phi3; write rope_theta at the top level"),
    ("qwen2 rope_scaling type", Qwen2Config, dict(rope_scaling={"type": "su", "factor": 2.0}),
     "rope_scaling.type must be one of"),
    ("heads do not divide hidden", InternLM2Config, dict(hidden_size=100, num_attention_heads=3),
     "hidden_size (100) must be divisible by num_attention_heads (3)"),
    ("kv heads do not divide heads", Qwen2Config, dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=3),
     "num_attention_heads (4) must be divisible by num_key_value_heads (3)"),
    ("kv heads zero", LlamaConfig, dict(num_key_value_heads=0), "num_key_value_heads must be an integer >= 1 (got 0"),
    ("layers as string", Phi3Config, dict(num_hidden_layers="32"),
     "num_hidden_layers must be an integer >= 1 (got '32' of type str)"),
    ("llm activation", InternLM2Config, dict(hidden_act="gelu"), "hidden_act must be one of ['silu']"),
    ("vit heads", InternVisionConfig, dict(hidden_size=1024, num_attention_heads=12),
     "hidden_size (1024) must be divisible by num_attention_heads (12)"),
    ("vit norm", InternVisionConfig, dict(norm_type="batch_norm"),
     "norm_type must be one of ['rms_norm', 'layer_norm'] (got 'batch_norm'"),
    ("mpt flash alibi", MPTConfig, dict(attn_config={"attn_impl": "flash", "alibi": True}),
     "attn_config.attn_impl must be 'torch' or 'triton' when attn_config.alibi is set"),
    ("mpt no positions", MPTConfig, dict(learned_pos_emb=False), "learned_pos_emb=true or attn_config.alibi=true"),
    ("mpt d_model", MPTConfig, dict(d_model=100, n_heads=16), "d_model (100) must be divisible by n_heads (16)"),
    ("mpt dropout", MPTConfig, dict(attn_config={"attn_pdrop": 1.5}), "attn_config.attn_pdrop must be a number in [0, 1]"),
    ("mpt logit_scale", MPTConfig, dict(logit_scale="sqrt"), "'inv_sqrt_d_model'"),
    ("mpt embedding_fraction", MPTConfig, dict(embedding_fraction=0), "embedding_fraction must be a number in (0, 1]"),
    ("mpt init name", MPTConfig, dict(init_config={"name": None}), "init_config.name must be"),
    ("chat no llm_config", InternVLChatConfig, dict(),
     "llm_config must be a dict whose architectures[0] is one of"),
    ("chat unknown architecture", InternVLChatConfig, dict(llm_config={"architectures": ["Gemma2ForCausalLM"]}),
     "llm_config.architectures[0] must be one of ['InternLM2ForCausalLM', 'LlamaForCausalLM', "
     "'Phi3ForCausalLM', 'Qwen2ForCausalLM'] (got 'Gemma2ForCausalLM')"),
    ("chat nested llm error", InternVLChatConfig,
     dict(llm_config={"architectures": ["InternLM2ForCausalLM"], "rope_scaling": {"type": "dynamic", "factor": 3}}),
     "llm_config: InternLM2Config: rope_scaling.factor must be a float >= 1.0 (got 3 of type int); write 3.0"),
    ("chat ps_version", InternVLChatConfig, dict(llm_config={"architectures": ["LlamaForCausalLM"]}, ps_version="v3"),
     "ps_version must be one of ['v1', 'v2'] (got 'v3'"),
    ("chat downsample", InternVLChatConfig,
     dict(llm_config={"architectures": ["LlamaForCausalLM"]}, force_image_size=448, downsample_ratio=0.3),
     "cannot be pixel-shuffled by downsample_ratio 0.3"),
    ("model_type mismatch", InternLM2Config.from_dict, {"model_type": "qwen2"},
     "model_type must be 'internlm2' (got 'qwen2'); use load_config()"),
]


@pytest.mark.parametrize("case", WRONG, ids=[case[0] for case in WRONG])
def test_wrong_config_raises_config_error(case):
    _, cls, kwargs, fragment = case
    with pytest.raises(ConfigError) as info:
        if cls == InternLM2Config.from_dict:
            cls(kwargs)
        else:
            cls(**kwargs)
    assert fragment in str(info.value)
    assert isinstance(info.value, ValueError)


def test_wrong_fixture_value_names_the_file(tmp_path):
    raw = fixture_dict("InternVL2-8B")
    raw["llm_config"]["rope_scaling"]["factor"] = 2
    path = tmp_path / "config.json"
    path.write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="rope_scaling.factor must be a float") as info:
        load_config(tmp_path)
    assert str(path) in str(info.value)


def test_unreadable_config_files_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="no such config file") as info:
        load_config(tmp_path)
    assert str(tmp_path / "config.json") in str(info.value)
    bad = tmp_path / "config.json"
    bad.write_text('{"model_type": "internlm2",')
    with pytest.raises(ConfigError, match="not valid JSON") as info:
        InternLM2Config.from_pretrained(tmp_path)
    assert str(bad) in str(info.value)
    bad.write_text('{"hidden_size": 64}')
    with pytest.raises(ConfigError, match="no model_type key") as info:
        load_config(bad)
    assert str(bad) in str(info.value)
    bad.write_text('[1, 2]')
    with pytest.raises(ConfigError, match="must be a JSON object"):
        load_config(bad)
    with pytest.raises(ConfigError, match="model_type 'gemma2' is not supported"):
        load_config({"model_type": "gemma2"})


def test_from_dict_does_not_mutate_its_input():
    raw = fixture_dict("InternVL2-4B")
    before = copy.deepcopy(raw)
    InternVLChatConfig.from_dict(raw)
    assert raw == before


# ---------------------------------------------------------------------------------------------------
# fields that later index or divide: refused at load time, not as an IndexError or a miscount later
# (issue 16). Each case: the kwargs, then fragments that must all be in the message (field, value, fix).

def chat_kwargs(**overrides):
    """A 300M-like ViT (24 layers, 448-px tiles of 14-px patches) with a Llama LLM, plus overrides."""
    vision = {"image_size": 448, "patch_size": 14, "num_hidden_layers": 24, "hidden_size": 64,
              "num_attention_heads": 4, "intermediate_size": 128}
    vision.update(overrides.pop("vision", {}))
    return dict(vision_config=vision, llm_config={"architectures": ["LlamaForCausalLM"]}, **overrides)


INDEXING_FIELDS = [
    ("select_layer below the embeddings", chat_kwargs(select_layer=-26),
     ["select_layer (-26)", "num_hidden_layers is 24", "[-25, 24]", "use -1"]),
    ("select_layer past the last layer", chat_kwargs(select_layer=25),
     ["select_layer (25)", "num_hidden_layers is 24", "[-25, 24]", "use -1"]),
    ("force_image_size not whole patches", chat_kwargs(force_image_size=450),
     ["force_image_size (450)", "patch_size (14)", "use 448 or 462"]),
    ("vision image_size not whole patches", chat_kwargs(vision={"image_size": 230}),
     ["vision_config: InternVisionConfig: image_size (230)", "patch_size (14)", "use 224 or 238"]),
    ("downsample_ratio not 1/r", chat_kwargs(force_image_size=448, downsample_ratio=0.4),
     ["downsample_ratio 0.4", "32x32 patch grid", "1/r for a whole number r dividing 32", "0.5, 0.25"]),
    ("downsample_ratio r not dividing the grid", chat_kwargs(force_image_size=84, downsample_ratio=0.25),
     ["downsample_ratio 0.25", "6x6 patch grid", "0.5, 0.333333, 0.166667", "change force_image_size"]),
    # 392 px = 28 patches, r = 7 divides it, but the reference's int(28²·(1/7)²) is 15, not the 16 the
    # shuffle makes: the prompt would carry one tile's worth of <IMG_CONTEXT> too few
    ("downsample_ratio miscounted by the reference formula", chat_kwargs(force_image_size=392, downsample_ratio=1 / 7),
     ["downsample_ratio 0.142857", "28x28 patch grid", "change force_image_size or downsample_ratio"]),
    ("min_dynamic_patch above max", chat_kwargs(min_dynamic_patch=8, max_dynamic_patch=6),
     ["min_dynamic_patch (8)", "max_dynamic_patch (6)", "swap them"]),
]


@pytest.mark.parametrize("kwargs, fragments", [case[1:] for case in INDEXING_FIELDS],
                         ids=[case[0] for case in INDEXING_FIELDS])
def test_fields_that_index_or_divide_are_checked(kwargs, fragments):
    with pytest.raises(ConfigError) as info:
        InternVLChatConfig(**kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))


def test_valid_edge_values_of_the_indexing_fields_load():
    # select_layer -(L+1) is hidden_states[0] (the embeddings) and L the last layer: both valid indices
    assert InternVLChatConfig(**chat_kwargs(select_layer=-25)).select_layer == -25
    assert InternVLChatConfig(**chat_kwargs(select_layer=24)).select_layer == 24
    # 1/4 on a 32-patch grid: 8×8 = 64 tokens per tile; 1 (no shuffle) keeps all 1024
    assert InternVLChatConfig(**chat_kwargs(downsample_ratio=0.25)).num_image_token == 64
    assert InternVLChatConfig(**chat_kwargs(downsample_ratio=1.0)).num_image_token == 1024
    assert InternVLChatConfig(**chat_kwargs(min_dynamic_patch=6, max_dynamic_patch=6)).max_dynamic_patch == 6
