"""KimiVLConfig: official config.json keys, lossless round trip, unknown keys kept, clear validation."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from kimivl import DeepseekV3Config, KimiVLConfig, MoonViTConfig


def test_golden_config_round_trips_exactly(golden_dir):
    raw = json.loads((golden_dir / "config.json").read_text())
    config = KimiVLConfig.from_pretrained(golden_dir)
    assert config.to_dict() == raw
    assert KimiVLConfig.from_dict(config.to_dict()) == config
    assert config.text_config.kv_lora_rank == 32 and config.vision_config.head_dim == 16
    assert config.media_placeholder_token_id == 763


@pytest.mark.parametrize("name", ["Kimi-VL-A3B-Instruct", "Kimi-VL-A3B-Thinking", "Kimi-VL-A3B-Thinking-2506"])
def test_release_configs_round_trip(name, configs_dir):
    raw = json.loads((configs_dir / name / "config.json").read_text())
    config = KimiVLConfig.from_pretrained(configs_dir / name)
    assert config.to_dict() == raw
    t = config.text_config
    assert (t.hidden_size, t.n_routed_experts, t.num_experts_per_tok, t.kv_lora_rank, t.q_lora_rank) == (2048, 64, 6, 512, None)
    assert t.qk_head_dim == 192 and t.rope_theta == 800000.0
    assert config.vision_config.hidden_size == 1152 and config.vision_config.num_hidden_layers == 27


def test_unknown_keys_are_kept(tmp_path, configs_dir):
    raw = json.loads((configs_dir / "test-tiny" / "config.json").read_text())
    raw["my_new_key"] = {"a": [1, 2]}
    raw["text_config"]["future_option"] = 3
    raw["vision_config"]["something"] = "x"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    config = KimiVLConfig.from_pretrained(tmp_path)
    assert config.extra["my_new_key"] == {"a": [1, 2]}
    assert config.text_config.extra == {"future_option": 3}
    assert config.to_dict() == raw
    config.save_pretrained(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == raw


def test_moe_layer_rule():
    t = DeepseekV3Config(num_hidden_layers=6, first_k_dense_replace=2, moe_layer_freq=2)
    assert [t.is_moe_layer(i) for i in range(6)] == [False, False, True, False, True, False]
    assert not DeepseekV3Config(n_routed_experts=None).is_moe_layer(3)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"topk_method": "best"}, "text_config.topk_method = 'best'"),
        ({"n_routed_experts": 10, "n_group": 3}, "n_group=3"),
        ({"num_experts_per_tok": 100}, "num_experts_per_tok = 100"),
        ({"hidden_act": "gelu"}, "hidden_act = 'gelu'"),
        ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling"),
        ({"rope_scaling": {"type": "yarn"}}, "text_config.rope_scaling = {'type': 'yarn'}: a 'yarn' block needs a "
                                             "'factor'"),
        ({"rope_scaling": {"type": "yarn", "factor": 0}}, "text_config.rope_scaling.factor = 0: must be a finite "
                                                          "number > 0"),
        ({"rope_scaling": {"rope_type": "yarn", "factor": "4"}}, "text_config.rope_scaling.factor = '4': must be"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "beta_fast": -1}}, "text_config.rope_scaling.beta_fast = -1"),
        ({"rope_scaling": {"type": "yarn", "factor": 4, "mscale_all_dim": None}},
         "text_config.rope_scaling.mscale_all_dim = None: must be a finite number >= 0"),
        ({"num_attention_heads": 0}, "text_config.num_attention_heads = 0: must be > 0"),
        ({"num_hidden_layers": -1}, "text_config.num_hidden_layers = -1: must be > 0"),
        ({"max_position_embeddings": 0}, "text_config.max_position_embeddings = 0: must be > 0"),
        ({"vocab_size": 0}, "text_config.vocab_size = 0: must be > 0"),
        ({"rms_norm_eps": -1}, "text_config.rms_norm_eps = -1: must be a finite number > 0"),
        ({"rms_norm_eps": 0.0}, "text_config.rms_norm_eps = 0.0: must be a finite number > 0"),
        ({"n_group": 0}, "text_config.n_group = 0: must be > 0"),
        ({"q_lora_rank": 0}, "text_config.q_lora_rank = 0: must be > 0 or null"),
    ],
)
def test_text_config_validation_names_key_and_value(kwargs, needle):
    with pytest.raises(ValueError, match="text_config") as e:
        DeepseekV3Config(**kwargs)
    assert needle in str(e.value)


def test_vision_config_validation():
    with pytest.raises(ValueError, match=r"vision_config.hidden_size = 100.*num_attention_heads=16"):
        MoonViTConfig(hidden_size=100)


@pytest.mark.parametrize("kwargs, needle", [
    ({"num_attention_heads": -4}, "vision_config.num_attention_heads = -4: must be > 0"),
    ({"num_attention_heads": 0}, "vision_config.num_attention_heads = 0: must be > 0"),
    ({"patch_size": 0}, "vision_config.patch_size = 0: must be > 0"),
    ({"num_hidden_layers": 0}, "vision_config.num_hidden_layers = 0: must be > 0"),
    ({"merge_kernel_size": [2, 0]}, "vision_config.merge_kernel_size = [2, 0]: must be > 0 in both entries"),
])
def test_vision_sizes_must_be_positive(kwargs, needle):
    with pytest.raises(ValueError) as e:
        MoonViTConfig(**kwargs)
    assert needle in str(e.value)


def test_every_shipped_config_passes_validation(configs_dir, golden_dir):
    import kimivl

    paths = sorted(configs_dir.glob("*/config.json")) + [golden_dir / "config.json",
                                                          Path(kimivl.DEMO_MODEL) / "config.json"]
    assert len(paths) >= 8
    for path in paths:
        KimiVLConfig.from_json_file(path)
    # DeepSeek-V3's own YaRN block passes too
    DeepseekV3Config(rope_scaling={"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                                   "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0})


def test_bad_json_is_named(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        KimiVLConfig.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KimiVLConfig.from_pretrained(tmp_path / "nope")


def test_a_file_that_is_not_a_config_is_named(tmp_path):
    import kimivl

    png = Path(kimivl.__file__).parent / "assets" / "examples" / "shape.png"  # `kimivl info shape.png`
    with pytest.raises(ValueError, match=r"shape\.png is not a config\.json: it is not UTF-8 text \(invalid start "
                                         r"byte at byte 0\)"):
        KimiVLConfig.from_pretrained(png)
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json is not a config\.json: it holds a JSON list, not an object"):
        KimiVLConfig.from_pretrained(tmp_path)


def test_unknown_keys_read_as_attributes(configs_dir):
    raw = json.loads((configs_dir / "test-tiny" / "config.json").read_text())
    raw["text_config"]["future_option"] = 3
    config = KimiVLConfig.from_dict(raw)
    assert config.text_config.future_option == 3
    with pytest.raises(AttributeError, match="DeepseekV3Config has no field or config.json key 'other'"):
        config.text_config.other  # noqa: B018


@pytest.mark.parametrize(
    "section, key, value, needle",
    [
        ("text_config", "hidden_size", "64", "text_config.hidden_size = '64': must be an integer, got str"),
        ("text_config", "num_hidden_layers", 2.5, "text_config.num_hidden_layers = 2.5: must be an integer, got float"),
        ("text_config", "norm_topk_prob", "yes", "text_config.norm_topk_prob = 'yes': must be true/false, got str"),
        ("text_config", "q_lora_rank", True, "text_config.q_lora_rank = True: must be an integer or null, got bool"),
        ("vision_config", "merge_kernel_size", [2, "2"], "vision_config.merge_kernel_size = [2, '2']: must be a list (an integer each), got list"),
        ("vision_config", "patch_size", None, "vision_config.patch_size = None: must be an integer, got NoneType"),
        (None, "media_placeholder_token_id", "763", "config.media_placeholder_token_id = '763': must be an integer"),
    ],
)
def test_values_of_the_wrong_json_type_are_named(golden_dir, section, key, value, needle):
    raw = json.loads((golden_dir / "config.json").read_text())
    (raw[section] if section else raw)[key] = value
    with pytest.raises(ValueError) as e:
        KimiVLConfig.from_dict(raw)
    assert needle in str(e.value)


def test_numbers_keep_their_json_form(golden_dir):
    raw = json.loads((golden_dir / "config.json").read_text())
    raw["text_config"]["rope_theta"] = 800000  # an integer where the field is a float: fine, and kept as written
    assert KimiVLConfig.from_dict(raw).to_dict()["text_config"]["rope_theta"] == 800000


def test_directory_without_config_json_is_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"no config.json in .*not a Kimi-VL checkpoint directory.*model.safetensors"):
        KimiVLConfig.from_pretrained(tmp_path)
